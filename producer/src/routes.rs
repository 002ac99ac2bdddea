//! Which event types a user may publish, and what event token each gets.

use std::collections::HashMap;
use std::str::FromStr;

use event_identity::VerifiedClaims;
use event_identity::route_spec;
use serde_json::Value;

/// One publishable event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRoute {
    /// The CloudEvents type, e.g. `com.example.order.created`.
    pub event_type: String,
    /// What a user token must show to publish this type.
    pub requires: Requirement,
    /// The one scope the event token gets, e.g. `events:order.created`.
    pub scope: String,
    /// The consumers' audience the event token is addressed to.
    pub audience: String,
}

/// The permission to publish an event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// The user token's scopes include this one (`requires=orders:write`).
    Scope(String),
    /// The user token's claim is one of these strings, or a list holding
    /// one of them (`requires_claim=roles:order-writer|admin`).
    Claim {
        /// Claim name.
        claim: String,
        /// Accepted values.
        values: Vec<String>,
    },
}

impl Requirement {
    /// Whether `user` meets it; `Err` says what is missing.
    pub fn check(&self, user: &VerifiedClaims) -> Result<(), String> {
        match self {
            Self::Scope(scope) if user.has_scope(scope) => Ok(()),
            Self::Scope(scope) => Err(format!("scope {scope}")),
            Self::Claim { claim, values } => {
                let held = match user.claim(claim) {
                    Some(Value::String(value)) => values.contains(value),
                    Some(Value::Array(items)) => items
                        .iter()
                        .filter_map(Value::as_str)
                        .any(|v| values.iter().any(|w| w == v)),
                    _ => false,
                };
                if held { Ok(()) } else { Err(format!("claim {claim} in {}", values.join("|"))) }
            }
        }
    }
}

impl FromStr for EventRoute {
    type Err = String;

    /// Parses `type=T,requires=S,scope=E,audience=A` (any order, all
    /// required), where `requires_claim=CLAIM:V1|V2` may replace `requires`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let known = ["type", "requires", "requires_claim", "scope", "audience"];
        let mut fields: HashMap<&str, String> = route_spec::fields(spec, &known, &[])?
            .into_iter()
            .map(|(name, value)| (name, value.to_owned()))
            .collect();
        let requires = match (fields.remove("requires"), fields.remove("requires_claim")) {
            (Some(scope), None) => Requirement::Scope(scope),
            (None, Some(spec)) => {
                let (claim, values) =
                    route_spec::claim_values(&spec, "requires_claim=CLAIM:V1|V2")?;
                Requirement::Claim { claim, values }
            }
            (Some(_), Some(_)) => return Err("give requires or requires_claim, not both".into()),
            (None, None) => return Err("requires= (or requires_claim=) is missing".into()),
        };
        let mut take =
            |name: &str| fields.remove(name).ok_or_else(|| format!("{name}= is missing"));
        Ok(Self {
            event_type: take("type")?,
            requires,
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
        assert_eq!(route.requires, Requirement::Scope("orders:write".into()));
        assert_eq!(route.scope, "events:order.created");
        assert_eq!(route.audience, "order-consumer");
    }

    #[test]
    fn a_claim_can_be_the_permission() {
        let route: EventRoute =
            "type=t,requires_claim=roles:order-writer|admin,scope=s,audience=a".parse().unwrap();
        let requirement = Requirement::Claim {
            claim: "roles".into(),
            values: vec!["order-writer".into(), "admin".into()],
        };
        assert_eq!(route.requires, requirement);
        let user = |claims: Value| VerifiedClaims {
            subject: "user-1".into(),
            issuer: "i".into(),
            audience: vec![],
            scopes: vec![],
            expires_at: 0,
            issued_at: None,
            token_id: None,
            key_id: "k".into(),
            claims: claims.as_object().unwrap().clone(),
        };
        assert!(
            requirement.check(&user(serde_json::json!({"roles": ["reader", "admin"]}))).is_ok()
        );
        assert!(requirement.check(&user(serde_json::json!({"roles": "order-writer"}))).is_ok());
        assert!(requirement.check(&user(serde_json::json!({"roles": ["reader"]}))).is_err());
        assert!(requirement.check(&user(serde_json::json!({}))).is_err());
    }

    #[test]
    fn names_what_is_wrong() {
        let both = "type=a,requires=b,requires_claim=c:d,scope=e,audience=f".parse::<EventRoute>();
        assert_eq!(both.unwrap_err(), "give requires or requires_claim, not both");
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
