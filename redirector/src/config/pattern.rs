//! `cgroup_pattern`: which cgroups discovery considers.

/// Whether a cgroup path (as in `/proc/PID/cgroup`, e.g.
/// `/kubepods.slice/kubepods-burstable.slice/...-pod<uid>.slice/cri-containerd-<id>.scope`)
/// matches `cgroup_pattern`. Deliberately not a regex: a pattern without `*` or
/// `?` matches if it occurs anywhere in the path (substring); a pattern with
/// them is a glob over the whole path, where `*` matches any run of characters
/// including `/` and `?` matches exactly one character. There is no escaping and
/// no `[...]` class.
pub fn cgroup_pattern_matches(pattern: &str, cgroup_path: &str) -> bool {
    if !pattern.contains(['*', '?']) {
        return cgroup_path.contains(pattern);
    }
    glob_match(pattern.as_bytes(), cgroup_path.as_bytes())
}

/// Iterative wildcard match with single backtracking point: linear enough for
/// cgroup paths and without recursion depth to worry about.
fn glob_match(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}
