//! Per event type: the scope its event token must carry, and the claims
//! policy that decides whether the token's subject may cause the event.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use event_identity::VerifiedClaims;
use event_identity::route_spec;
use serde_json::Value;

/// A claims-based authorization rule, checked after the token is verified.
pub trait ClaimsPolicy: Send + Sync {
    /// `Ok(())` to allow, or `Err(detail)` to refuse with reason
    /// `forbidden`. `data` is the event's JSON data.
    fn check(&self, claims: &VerifiedClaims, data: &Value) -> Result<(), String>;
}

/// A declarative rule from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// The token's claim must equal the payload's top-level field (for
    /// example, the `tenant` claim must equal `data.tenant`).
    ClaimEqualsField {
        /// Claim name.
        claim: String,
        /// Field of the event data.
        field: String,
    },
    /// The token's claim must be one of these strings.
    ClaimIn {
        /// Claim name.
        claim: String,
        /// Allowed values.
        values: Vec<String>,
    },
}

impl ClaimsPolicy for Rule {
    fn check(&self, claims: &VerifiedClaims, data: &Value) -> Result<(), String> {
        match self {
            Self::ClaimEqualsField { claim, field } => {
                let Some(expected) = claims.claim(claim).filter(|v| !v.is_null()) else {
                    return Err(format!("the token has no {claim} claim"));
                };
                match data.get(field) {
                    Some(actual) if actual == expected => Ok(()),
                    Some(_) => {
                        Err(format!("data.{field} does not match the token's {claim} claim"))
                    }
                    None => Err(format!("data.{field} is missing")),
                }
            }
            Self::ClaimIn { claim, values } => match claims.claim(claim).and_then(Value::as_str) {
                Some(value) if values.iter().any(|v| v == value) => Ok(()),
                Some(_) => Err(format!("the token's {claim} claim is not an allowed value")),
                None => Err(format!("the token has no string {claim} claim")),
            },
        }
    }
}

/// A route as written in configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// The event type.
    pub event_type: String,
    /// The one scope its event token must carry.
    pub scope: String,
    /// Declarative claims rules, all of which must pass.
    pub rules: Vec<Rule>,
}

impl FromStr for RouteSpec {
    type Err = String;

    /// Parses `type=T,scope=S[,claim_equals_field=C:F][,claim_in=C:V1|V2]`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let known = ["type", "scope", "claim_equals_field", "claim_in"];
        let (mut event_type, mut scope, mut rules) = (None, None, Vec::new());
        for (name, value) in route_spec::fields(spec, &known, &known[2..])? {
            match name {
                "type" => event_type = Some(value.to_owned()),
                "scope" => scope = Some(value.to_owned()),
                "claim_equals_field" => {
                    let (claim, field) = route_spec::pair(value, "claim_equals_field=CLAIM:FIELD")?;
                    rules.push(Rule::ClaimEqualsField { claim, field });
                }
                _ => {
                    let (claim, values) = route_spec::claim_values(value, "claim_in=CLAIM:V1|V2")?;
                    rules.push(Rule::ClaimIn { claim, values });
                }
            }
        }
        Ok(Self {
            event_type: event_type.ok_or("type= is missing")?,
            scope: scope.ok_or("scope= is missing")?,
            rules,
        })
    }
}

/// What a consumer checks for one event type.
#[derive(Clone)]
pub struct Route {
    /// The one scope the event token must carry.
    pub scope: String,
    /// Every policy must allow the event.
    pub policies: Vec<Arc<dyn ClaimsPolicy>>,
}

impl Route {
    /// Runs every policy; the first refusal wins.
    pub fn authorize(&self, claims: &VerifiedClaims, data: &Value) -> Result<(), String> {
        self.policies.iter().try_for_each(|p| p.check(claims, data))
    }
}

/// Routes by event type.
#[derive(Clone, Default)]
pub struct Routes(HashMap<String, Route>);

impl Routes {
    /// Builds routes from configuration, refusing a type given twice.
    pub fn from_specs(specs: &[RouteSpec]) -> Result<Self, String> {
        let mut routes = Self::default();
        for spec in specs {
            let policies =
                spec.rules.iter().map(|r| Arc::new(r.clone()) as Arc<dyn ClaimsPolicy>).collect();
            routes.insert(&spec.event_type, Route { scope: spec.scope.clone(), policies })?;
        }
        Ok(routes)
    }

    /// Adds a route.
    pub fn insert(&mut self, event_type: &str, route: Route) -> Result<(), String> {
        if self.0.insert(event_type.to_owned(), route).is_some() {
            return Err(format!("event type {event_type:?} is routed twice"));
        }
        Ok(())
    }

    /// Adds a code policy to an existing route.
    pub fn add_policy(
        &mut self,
        event_type: &str,
        policy: Arc<dyn ClaimsPolicy>,
    ) -> Result<(), String> {
        let route =
            self.0.get_mut(event_type).ok_or_else(|| format!("no route for {event_type:?}"))?;
        route.policies.push(policy);
        Ok(())
    }

    /// The route of `event_type`.
    pub fn get(&self, event_type: &str) -> Option<&Route> {
        self.0.get(event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let spec: RouteSpec =
            "type=com.example.order.created,scope=events:order.created,claim_equals_field=tenant:tenant,claim_in=tenant:acme|globex"
                .parse()
                .unwrap();
        assert_eq!(spec.scope, "events:order.created");
        assert_eq!(
            spec.rules,
            vec![
                Rule::ClaimEqualsField { claim: "tenant".into(), field: "tenant".into() },
                Rule::ClaimIn {
                    claim: "tenant".into(),
                    values: vec!["acme".into(), "globex".into()]
                },
            ]
        );
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!("type=a".parse::<RouteSpec>().unwrap_err(), "scope= is missing");
        assert!(
            "type=a,scope=b,claim_in=tenant"
                .parse::<RouteSpec>()
                .unwrap_err()
                .contains("claim_in=CLAIM")
        );
    }
}
