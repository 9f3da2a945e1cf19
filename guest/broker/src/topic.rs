//! Topic names and topic filters (MQTT 5.0 section 4.7, same rules in 3.1.1):
//! validation, the `$` rule, shared-subscription syntax, and matching.
//!
//! Owns the reference matcher [`matches`], which the subscription index is
//! tested against. Never allocates while matching.

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    /// A wildcard in a topic name, or one misplaced in a filter.
    BadWildcard,
    TooLong,
    TooManyLevels,
    /// `$share/` without a valid group or filter.
    BadShare,
}

/// Limits on topics, from the broker configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    pub max_len: usize,
    pub max_levels: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        TopicLimits { max_len: 65_535, max_levels: 128 }
    }
}

fn check_size(s: &str, limits: TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_len {
        return Err(TopicError::TooLong);
    }
    if s.split('/').count() > limits.max_levels {
        return Err(TopicError::TooManyLevels);
    }
    Ok(())
}

/// Checks a PUBLISH topic name: no wildcards anywhere.
pub fn validate_name(name: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_size(name, limits)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::BadWildcard);
    }
    Ok(())
}

/// Checks a subscription filter (without any `$share/group/` prefix).
pub fn validate_filter(filter: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_size(filter, limits)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" if levels.peek().is_some() => return Err(TopicError::BadWildcard),
            "#" | "+" => {}
            _ if level.contains(['+', '#']) => return Err(TopicError::BadWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// A filter as subscribed: plain, or `$share/{group}/{filter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share_name: Option<&'a str>,
    pub filter: &'a str,
}

/// Splits off and checks a shared-subscription prefix, then the filter.
pub fn parse_filter(raw: &str, limits: TopicLimits) -> Result<ParsedFilter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return Err(TopicError::BadShare);
        }
        validate_filter(filter, limits)?;
        return Ok(ParsedFilter { share_name: Some(group), filter });
    }
    validate_filter(raw, limits)?;
    Ok(ParsedFilter { share_name: None, filter: raw })
}

/// True if topic name `name` matches `filter` (both already validated).
/// Filters starting with a wildcard do not match names starting with `$`.
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: TopicLimits = TopicLimits { max_len: 65_535, max_levels: 128 };

    #[test]
    fn names_refuse_wildcards_and_emptiness() {
        assert_eq!(validate_name("a/b", L), Ok(()));
        assert_eq!(validate_name("/", L), Ok(()));
        assert_eq!(validate_name("", L), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+", L), Err(TopicError::BadWildcard));
        assert_eq!(validate_name("a#", L), Err(TopicError::BadWildcard));
    }

    #[test]
    fn filter_wildcards_must_fill_their_level() {
        for ok in ["#", "+", "a/#", "+/+", "a/+/b", "/+", "+/"] {
            assert_eq!(validate_filter(ok, L), Ok(()), "{ok}");
        }
        for bad in ["a#", "a/#/b", "a+", "+a/b", "#/"] {
            assert_eq!(validate_filter(bad, L), Err(TopicError::BadWildcard), "{bad}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let limits = TopicLimits { max_len: 5, max_levels: 2 };
        assert_eq!(validate_name("abcdef", limits), Err(TopicError::TooLong));
        assert_eq!(validate_name("a/b/c", limits), Err(TopicError::TooManyLevels));
    }

    #[test]
    fn shared_subscriptions_parse() {
        assert_eq!(parse_filter("$share/g/a/+", L), Ok(ParsedFilter { share_name: Some("g"), filter: "a/+" }));
        assert_eq!(parse_filter("$share/g", L), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share//a", L), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share/g+/a", L), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$sharex/g/a", L), Ok(ParsedFilter { share_name: None, filter: "$sharex/g/a" }));
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }
}
