//! Bounds checked when a template loads, before any body reaches it.
//!
//! liquid has no limits of its own, and its `for` and `tablerow` tags collect a whole `(a..b)` range into a
//! vector before the first iteration: `{% for i in (1..100000000) %}` allocates gigabytes whatever the loop body
//! does, and `(1..n)` with `n` from a webhook body lets the sender choose. So ranges must have integer-literal
//! bounds, and the spans of every range in a leaf, multiplied (a bound on nested loops), may not exceed
//! `templates.max_loop_iterations`. Loops over arrays from the body stay allowed: the body's size bounds them.
//!
//! Also refused: integer literals beyond i64 inside `{{ }}` or `{% %}`. liquid-core's parser panics on them
//! ("Grammar ensures matches are parseable as integers"; found by the `render` fuzz target).

/// Limits applied while loading templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    /// Largest template file, in bytes.
    pub max_template_bytes: u64,
    /// Most iterations the range loops of one leaf may run together.
    pub max_loop_iterations: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self { max_template_bytes: super::MAX_TEMPLATE_BYTES, max_loop_iterations: 10_000 }
    }
}

/// Checks the range loops and integer literals of one leaf's Liquid text. The message says what to change.
pub fn check_loops(leaf: &str, limits: &LoadLimits) -> Result<(), String> {
    for (open, close) in [("{{", "}}"), ("{%", "%}")] {
        let mut rest = leaf;
        while let Some(at) = rest.find(open) {
            let after = &rest[at + 2..];
            let end = after.find(close).unwrap_or(after.len());
            check_integers(&after[..end])?;
            rest = &after[end..];
        }
    }
    let mut product: u128 = 1;
    let mut rest = leaf;
    while let Some(open) = rest.find("{%") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("%}") else { break };
        let tag = &after[..close];
        for range in ranges(tag) {
            let (a, b) = range;
            let (Ok(start), Ok(stop)) = (a.trim().parse::<i64>(), b.trim().parse::<i64>()) else {
                return Err(format!(
                    "range ({}..{}): range bounds must be integer literals, because liquid builds the whole range \
                     before looping; loop over an array instead (`for x in list limit: 100`)",
                    a.trim(),
                    b.trim()
                ));
            };
            let span = if stop < start { 0 } else { (i128::from(stop) - i128::from(start) + 1) as u128 };
            product = product.saturating_mul(span.max(1));
            if product > u128::from(limits.max_loop_iterations) {
                return Err(format!(
                    "range ({start}..{stop}) makes this leaf loop more than {} times (templates.max_loop_iterations)",
                    limits.max_loop_iterations
                ));
            }
        }
        rest = &after[close + 2..];
    }
    Ok(())
}

/// Integer literals (outside quotes) must fit i64.
fn check_integers(code: &str) -> Result<(), String> {
    let bytes = code.as_bytes();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if c == b'"' || c == b'\'' {
            quote = Some(c);
            i += 1;
            continue;
        }
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if c.is_ascii_digit() && starts_word {
            let start = if i > 0 && bytes[i - 1] == b'-' { i - 1 } else { i };
            let mut end = i;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
            let float = bytes.get(end) == Some(&b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit);
            if !float && code[start..end].parse::<i64>().is_err() {
                let shown: String = code[start..end].chars().take(24).collect();
                return Err(format!("integer literal {shown}... is beyond the 64-bit range liquid can hold"));
            }
            i = end;
            continue;
        }
        i += 1;
    }
    Ok(())
}

/// Every `( a .. b )` in a tag's text, as the two bound texts. Quoted text is skipped.
fn ranges(tag: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let bytes = tag.as_bytes();
    let mut i = 0;
    let mut quote: Option<u8> = None;
    let mut open: Option<usize> = None;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                b'"' | b'\'' => quote = Some(c),
                b'(' => open = Some(i + 1),
                b')' => {
                    if let Some(start) = open.take() {
                        let inner = &tag[start..i];
                        if let Some((a, b)) = inner.split_once("..") {
                            out.push((a, b));
                        }
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(leaf: &str) -> Result<(), String> {
        check_loops(leaf, &LoadLimits::default())
    }

    #[test]
    fn a_huge_literal_range_is_refused_at_load() {
        let err = check("{% for i in (1..100000000) %}x{% endfor %}").unwrap_err();
        assert!(err.contains("templates.max_loop_iterations"), "{err}");
        assert!(check("{%- tablerow i in (0..99999999) -%}{{ i }}{% endtablerow %}").is_err());
    }

    #[test]
    fn a_range_bound_from_a_variable_is_refused_at_load() {
        let err = check("{% for i in (1..profile.count) %}x{% endfor %}").unwrap_err();
        assert!(err.contains("integer literals"), "{err}");
        assert!(check("{% for i in (n..5) %}x{% endfor %}").is_err());
    }

    #[test]
    fn integer_literals_beyond_i64_are_refused_before_liquid_can_panic_on_them() {
        let err = check("{% for x in 44444444444444444444444nil %}{% endfor %}").unwrap_err();
        assert!(err.contains("64-bit"), "{err}");
        assert!(check("{{ 99999999999999999999 }}").is_err());
        assert!(check("{{ x | plus: -9223372036854775809 }}").is_err());
        assert!(check("{{ x | plus: 9223372036854775807 }}").is_ok());
        assert!(check("{{ 99999999999999999999.5 }}").is_ok(), "a float literal is parsed as f64");
        assert!(check("{{ '99999999999999999999' }} and 99999999999999999999 outside tags").is_ok());
        assert!(check("{{ a99999999999999999999 }}").is_ok(), "part of a name");
    }

    #[test]
    fn nested_ranges_multiply() {
        assert!(check("{% for i in (1..100) %}{% for j in (1..100) %}x{% endfor %}{% endfor %}").is_ok());
        assert!(check("{% for i in (1..100) %}{% for j in (1..101) %}x{% endfor %}{% endfor %}").is_err());
    }

    #[test]
    fn small_ranges_array_loops_and_quoted_text_pass() {
        assert!(check("{% for i in (1..10) %}{{ i }}{% endfor %}").is_ok());
        assert!(check("{% for x in items limit: 5 %}{{ x }}{% endfor %}").is_ok());
        assert!(check("{% if a == '(1..n)' %}y{% endif %}").is_ok());
        assert!(check("(1..n) in plain text is not a loop {{ x }}").is_ok());
        assert!(check("{% for i in (5..1) %}x{% endfor %}").is_ok(), "an empty range runs nothing");
    }
}
