//! `cgroup_pattern`: which cgroups discovery considers.

use std::cell::RefCell;

use globset::{GlobBuilder, GlobMatcher};

/// Whether a cgroup path (as in `/proc/PID/cgroup`, e.g.
/// `/kubepods.slice/kubepods-burstable.slice/...-pod<uid>.slice/cri-containerd-<id>.scope`)
/// matches `cgroup_pattern`. Deliberately not a regex: a pattern without `*` or
/// `?` matches if it occurs anywhere in the path (substring); a pattern with
/// them is a glob over the whole path, where `*` matches any run of characters
/// including `/` and `?` matches exactly one byte. There is no escaping and
/// no `[...]` class: every other character, `\`, `[` and `{` included, is
/// itself (systemd writes `\x2d` into unit names).
pub fn cgroup_pattern_matches(pattern: &str, cgroup_path: &str) -> bool {
    if !pattern.contains(['*', '?']) {
        return cgroup_path.contains(pattern);
    }
    // One pattern per agent; each inspector thread compiles it once.
    thread_local! {
        static COMPILED: RefCell<Option<(String, Option<GlobMatcher>)>> = const { RefCell::new(None) };
    }
    COMPILED.with_borrow_mut(|cached| {
        if cached.as_ref().is_none_or(|(p, _)| p != pattern) {
            *cached = Some((pattern.to_owned(), glob(pattern)));
        }
        // A pattern globset refused (none can be: see `glob`) matches nothing.
        cached
            .as_ref()
            .and_then(|(_, m)| m.as_ref())
            .is_some_and(|m| m.is_match(cgroup_path))
    })
}

/// `pattern` as a globset glob of the semantics above: `*` may cross `/`
/// (`literal_separator` off), runs of `*` are one `*` (globset's `**` would
/// also match an empty path component, `**/x` matching `x`), no backslash
/// escapes, and every character but `*` and `?` escaped (`[`, `]`, `{`, `}`
/// would start classes and alternations). globset matches bytes, anchored at
/// both ends: `?` is one byte, as before.
fn glob(pattern: &str) -> Option<GlobMatcher> {
    let mut escaped = String::with_capacity(pattern.len() * 2);
    let mut prev_star = false;
    for c in pattern.chars() {
        match c {
            '*' if prev_star => continue,
            '*' | '?' => escaped.push(c),
            _ => escaped.push_str(&globset::escape(c.encode_utf8(&mut [0; 4]))),
        }
        prev_star = c == '*';
    }
    GlobBuilder::new(&escaped)
        .literal_separator(false)
        .backslash_escape(false)
        .build()
        .map(|g| g.compile_matcher())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matcher this module had before globset (iterative wildcard match
    /// over bytes, one backtracking point): the reference for the semantics.
    fn reference(pat: &[u8], text: &[u8]) -> bool {
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

    /// Characters globset would read as syntax are themselves.
    #[test]
    fn glob_syntax_is_literal() {
        let path = r"/system.slice/system-tempo\x2dlive.slice/a[1]{b,c}!.scope";
        for pat in [
            r"*tempo\x2dlive*",
            r"*a[1]{b,c}!.scope",
            "*a[?]{b,c}!.scope",
            "/system.slice/**/*.scope",
            "**",
        ] {
            assert!(cgroup_pattern_matches(pat, path), "{pat}");
        }
        for pat in ["*a[12]*", "*{b,c}.scope", "*ab*", r"*tempo-live*", "**/b*"] {
            assert!(!cgroup_pattern_matches(pat, path), "{pat}");
        }
        // `**/x` is `*/x`: a `/` is needed, unlike globset's recursive `**`.
        assert!(!cgroup_pattern_matches("**/x", "x"));
        assert!(cgroup_pattern_matches("**/x", "/x"));
        // `?` is one byte; a pattern change is picked up on the same thread.
        assert!(cgroup_pattern_matches("/??", "/é"));
        assert!(!cgroup_pattern_matches("/?", "/é"));
        assert!(cgroup_pattern_matches("*", ""));
        assert!(!cgroup_pattern_matches("?", ""));
        assert!(
            cgroup_pattern_matches("a\n*", "a\nb"),
            "`*` crosses newlines"
        );
    }

    /// Every pattern and path over a small alphabet up to a few characters:
    /// the globset matcher says what the reference says.
    #[test]
    fn agrees_with_the_reference_exhaustively() {
        fn all(alphabet: &[char], max: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                    .collect();
                out.extend(last.iter().cloned());
            }
            out
        }
        let patterns = all(&['a', '/', '*', '?', '['], 4);
        let paths = all(&['a', 'b', '/', '['], 4);
        let mut checked = 0;
        for pat in patterns.iter().filter(|p| p.contains(['*', '?'])) {
            for path in &paths {
                assert_eq!(
                    cgroup_pattern_matches(pat, path),
                    reference(pat.as_bytes(), path.as_bytes()),
                    "{pat:?} on {path:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn every_pattern_compiles() {
        for pat in [
            "*", "?", r"\", "[", "]", "{", "}", "[!a]", "{a,", "***", r"\*", "a**b",
        ] {
            assert!(glob(pat).is_some(), "{pat}");
        }
    }

    #[test]
    fn cgroup_patterns() {
        let kube = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-abcd.scope";
        assert!(cgroup_pattern_matches("pod1234", kube));
        assert!(!cgroup_pattern_matches("pod9999", kube));
        assert!(cgroup_pattern_matches("/kubepods.slice/*pod1234*", kube));
        assert!(cgroup_pattern_matches("*cri-containerd-????.scope", kube));
        assert!(!cgroup_pattern_matches("*cri-containerd-???.scope", kube));
        // A glob is anchored at both ends; a plain substring is not.
        assert!(!cgroup_pattern_matches("kubepods.slice*", kube));
        assert!(cgroup_pattern_matches("*", kube));
        assert!(cgroup_pattern_matches("*a*b*c*", "xaybzc"));
        assert!(!cgroup_pattern_matches("*a*b*c", "xaybzcd"));
    }
}
