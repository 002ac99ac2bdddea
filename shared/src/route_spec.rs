//! The one syntax both services read routes in: `name=value` fields
//! separated by commas, such as `type=T,scope=S,claim_in=tenant:acme|umbrella`.
//! Values are single words: a space or control character in a scope or an
//! event type would never match what the other side sends.

/// The fields of `spec`, in order. Every name must be in `known`; names
/// not in `repeatable` may appear once; every value is one word.
pub fn fields<'a>(
    spec: &'a str,
    known: &[&str],
    repeatable: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) =
            part.split_once('=').ok_or_else(|| format!("{part:?} is not name=value"))?;
        let (name, value) = (name.trim(), value.trim());
        if !known.contains(&name) {
            return Err(format!("unknown field {name:?} (expected {})", known.join(", ")));
        }
        if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(format!("{name} must be one word, got {value:?}"));
        }
        if !repeatable.contains(&name) && seen.iter().any(|(n, _)| *n == name) {
            return Err(format!("{name} is given twice"));
        }
        seen.push((name, value));
    }
    Ok(seen)
}

/// `A:B`, both parts non-empty; `form` names the expected shape.
pub fn pair(value: &str, form: &str) -> Result<(String, String), String> {
    match value.split_once(':') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
        _ => Err(format!("expected {form}, got {value:?}")),
    }
}

/// `CLAIM:V1|V2...`: a claim name and one or more values, none empty.
pub fn claim_values(value: &str, form: &str) -> Result<(String, Vec<String>), String> {
    let (claim, values) = pair(value, form)?;
    let values: Vec<String> = values.split('|').map(str::to_owned).collect();
    if values.iter().any(String::is_empty) {
        return Err(format!("expected {form} with no empty value, got {value:?}"));
    }
    Ok((claim, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["type", "scope", "rule"];

    #[test]
    fn reads_fields_in_order() {
        let read = fields(" type=a.b , scope=s,rule=x,rule=y,", KNOWN, &["rule"]).unwrap();
        assert_eq!(read, [("type", "a.b"), ("scope", "s"), ("rule", "x"), ("rule", "y")]);
    }

    #[test]
    fn refuses_what_cannot_match() {
        for (spec, error) in [
            ("type=a,scope=events:x openid", "scope must be one word"),
            ("type=a\u{1}b", "type must be one word"),
            ("type=", "type must be one word"),
            ("type=a,type=b", "type is given twice"),
            ("kind=a", "unknown field \"kind\""),
            ("type", "is not name=value"),
        ] {
            let got = fields(spec, KNOWN, &["rule"]).unwrap_err();
            assert!(got.contains(error), "{spec:?}: {got}");
        }
    }

    #[test]
    fn claim_values_need_a_claim_and_non_empty_values() {
        assert_eq!(
            claim_values("tenant:acme|umbrella", "C:V").unwrap(),
            ("tenant".to_owned(), vec!["acme".to_owned(), "umbrella".to_owned()])
        );
        for bad in ["tenant:acme|", "tenant:|acme", "tenant:a||b", ":acme", "tenant:", "tenant"] {
            assert!(claim_values(bad, "C:V").is_err(), "{bad}");
        }
    }
}
