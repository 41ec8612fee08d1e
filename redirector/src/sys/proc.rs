//! What /proc says of a process that others may print: its name, which the
//! process (a pod's) chooses, so it is escaped and bounded before it goes
//! into a log line, a record or a terminal.

/// The name process `pid` gives itself (`prctl(PR_SET_NAME)`), escaped for
/// logs and terminals; `None` once it has exited.
pub fn comm(pid: i32) -> Option<String> {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(sanitize(name.trim(), 16))
}

/// A string a pod controls, made safe to log or print: control characters
/// (ESC, newlines) escaped, at most `max` characters kept.
pub fn sanitize(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
