//! PASS/FAIL tables, as `redirector check` prints them with or without
//! `--tempo-ring`: one line per check, names aligned so a column of FAILs
//! stands out, and the fix on the line of each failure.

use serde::Serialize;

/// One check's line. Its JSON (`--output json`) is the same fields, `fix`
/// only on a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub name: String,
    pub ok: bool,
    /// What was found, in words an operator can act on.
    pub detail: String,
    /// What to change when `ok` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Row {
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// `PASS  name  detail`, or `FAIL  name  detail; fix: ...`, a line each.
pub fn render(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in rows {
        let status = if r.ok { "PASS" } else { "FAIL" };
        out.push_str(&format!("{status}  {:<width$}  {}", r.name, r.detail));
        if let (false, Some(fix)) = (r.ok, &r.fix) {
            out.push_str("; fix: ");
            out.push_str(fix);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_align_and_only_failures_show_their_fix() {
        let mut odd = Row::pass("a", "fine");
        odd.fix = Some("never shown".into());
        let rows = [odd, Row::fail("longer name", "broken", "mend it")];
        assert_eq!(
            render(&rows),
            "PASS  a            fine\nFAIL  longer name  broken; fix: mend it\n"
        );
        assert_eq!(render(&[]), "");
    }
}
