//! Which event types a user may publish, and what event token each gets.

use std::collections::HashMap;
use std::str::FromStr;

/// One publishable event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRoute {
    /// The CloudEvents type, e.g. `com.example.order.created`.
    pub event_type: String,
    /// The scope a user token must carry to publish this type, e.g.
    /// `orders:write`.
    pub requires: String,
    /// The one scope the event token gets, e.g. `events:order.created`.
    pub scope: String,
    /// The consumers' audience the event token is addressed to.
    pub audience: String,
}

impl FromStr for EventRoute {
    type Err = String;

    /// Parses `type=T,requires=S,scope=E,audience=A` (any order, all four
    /// required).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut fields = HashMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) =
                part.split_once('=').ok_or_else(|| format!("{part:?} is not name=value"))?;
            let (name, value) = (name.trim(), value.trim());
            if !matches!(name, "type" | "requires" | "scope" | "audience") {
                return Err(format!(
                    "unknown field {name:?} (expected type, requires, scope, audience)"
                ));
            }
            if value.is_empty() || value.contains(char::is_whitespace) {
                return Err(format!("{name} must be one word, got {value:?}"));
            }
            if fields.insert(name, value.to_owned()).is_some() {
                return Err(format!("{name} is given twice"));
            }
        }
        let mut take =
            |name: &str| fields.remove(name).ok_or_else(|| format!("{name}= is missing"));
        Ok(Self {
            event_type: take("type")?,
            requires: take("requires")?,
            scope: take("scope")?,
            audience: take("audience")?,
        })
    }
}

/// The routes by event type.
#[derive(Debug, Clone, Default)]
pub struct Routes(HashMap<String, EventRoute>);

impl Routes {
    /// Indexes `routes`, refusing two routes for one type.
    pub fn new(routes: impl IntoIterator<Item = EventRoute>) -> Result<Self, String> {
        let mut map = HashMap::new();
        for route in routes {
            if let Some(previous) = map.insert(route.event_type.clone(), route) {
                return Err(format!("event type {:?} is routed twice", previous.event_type));
            }
        }
        Ok(Self(map))
    }

    /// The route of `event_type`.
    pub fn get(&self, event_type: &str) -> Option<&EventRoute> {
        self.0.get(event_type)
    }

    /// Whether no route is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_route() {
        let route: EventRoute =
            "type=com.example.order.created, requires=orders:write,scope=events:order.created,audience=order-consumer"
                .parse()
                .unwrap();
        assert_eq!(route.event_type, "com.example.order.created");
        assert_eq!(route.requires, "orders:write");
        assert_eq!(route.scope, "events:order.created");
        assert_eq!(route.audience, "order-consumer");
    }

    #[test]
    fn names_what_is_wrong() {
        let missing = "type=a,requires=b,scope=c".parse::<EventRoute>().unwrap_err();
        assert_eq!(missing, "audience= is missing");
        let unknown = "type=a,colour=b".parse::<EventRoute>().unwrap_err();
        assert!(unknown.contains("unknown field \"colour\""), "{unknown}");
        let twice = "type=a,type=b".parse::<EventRoute>().unwrap_err();
        assert_eq!(twice, "type is given twice");
    }

    #[test]
    fn refuses_a_type_routed_twice() {
        let route: EventRoute = "type=a,requires=b,scope=c,audience=d".parse().unwrap();
        assert!(Routes::new([route.clone(), route]).is_err());
    }
}
