//! The one layering rule of `run`'s settings: command line > environment >
//! redirector.yaml > default.
//!
//! Every setting is defined once, as a field of `run`'s arguments (`commands::run::args::RunArgs`): its
//! flag and environment variable (clap, which already puts a flag over its
//! environment variable) and its redirector.yaml key (serde, the same field)
//! come from that one definition. [`run_settings!`] writes the struct and the
//! key-by-key merge of two layers ([`Layer`]), so no setting has merge code of
//! its own; the defaults come last, where the arguments are resolved into
//! [`super::settings::Settings`].

/// A setting's value in one layer: set there, or left to the layer below.
pub trait Layer {
    /// `self` where it is set, else `under`.
    fn over(self, under: Self) -> Self;
}

/// `None` is "not set here".
impl<T> Layer for Option<T> {
    fn over(self, under: Self) -> Self {
        self.or(under)
    }
}

/// A list given in a layer replaces the one below (not appended to it): the
/// flag `--netns a` means "a", whatever redirector.yaml lists.
impl<T> Layer for Vec<T> {
    fn over(self, under: Self) -> Self {
        if self.is_empty() {
            under
        } else {
            self
        }
    }
}

/// Only for what is not a file key (`--dry-run`): set if any layer sets it.
impl Layer for bool {
    fn over(self, under: Self) -> Self {
        self || under
    }
}

/// Writes the settings struct as given (attributes and doc comments included)
/// and its `over`, which applies [`Layer::over`] to every field.
macro_rules! run_settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// Every setting of `self` where it is set, else of `under`: the
            /// command line and environment over redirector.yaml.
            pub fn over(self, under: Self) -> Self {
                Self {
                    $( $field: $crate::config::layers::Layer::over(self.$field, under.$field), )*
                }
            }
        }
    };
}
pub(crate) use run_settings;
