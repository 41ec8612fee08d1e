//! Loads of context fields the verifier accepts.
//!
//! Each u32 of an address is read on its own with a volatile load. Otherwise
//! LLVM turns "pick the IPv4 or the IPv6 value" into one load through a
//! pointer chosen between `ctx + 16` and `ctx + 20`, and the verifier rejects
//! loads through a derived context pointer.

macro_rules! ctx_u32 {
    ($ptr:expr, $field:ident) => {
        core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field))
    };
}

macro_rules! ctx_ip6 {
    ($ptr:expr, $field:ident) => {
        [
            core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[0])),
            core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[1])),
            core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[2])),
            core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[3])),
        ]
    };
}

pub(crate) use {ctx_ip6, ctx_u32};
