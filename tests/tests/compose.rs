//! Keeps `docker-compose.yml` honest without Docker: the realm it mounts
//! exists and is the one the tests import, every setting it gives the
//! producer and consumer is one they know (and accept), and its ports, URLs,
//! credentials, scopes and image versions agree with each other, with the
//! realm, and with what the test scripts run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use event_identity_consumer::ConsumerConfig;
use event_identity_producer::ProducerConfig;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn compose() -> Yaml {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let service = &compose["services"][name];
    assert!(!service.is_badvalue(), "service {name} is missing");
    service
}

/// A service's environment as strings.
fn environment(service: &Yaml) -> HashMap<String, String> {
    let hash = service["environment"].as_hash().expect("an environment map");
    hash.iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                other => panic!("unexpected value {other:?}"),
            };
            (k.as_str().unwrap().to_owned(), value)
        })
        .collect()
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

/// The container port a service publishes (`host:port:container`).
fn container_ports(service: &Yaml) -> Vec<u16> {
    strings(&service["ports"])
        .iter()
        .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

/// The healthcheck's command as one string.
fn healthcheck(service: &Yaml) -> String {
    strings(&service["healthcheck"]["test"]).join(" ")
}

/// Turns compose environment variables into flags of `command` and parses
/// them, so that every variable must be a known setting (the caller then
/// parses them, so that every value must be accepted).
fn flags_from_env(command: &clap::Command, env: &HashMap<String, String>) -> Vec<String> {
    let by_env: HashMap<String, &clap::Arg> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a)))
        .collect();
    let mut flags = vec![command.get_name().to_owned()];
    for (name, value) in env {
        let arg = by_env
            .get(name)
            .unwrap_or_else(|| panic!("{} does not know the setting {name}", command.get_name()));
        let long = arg.get_long().unwrap();
        if !arg.get_action().takes_values() {
            assert!(["true", "false"].contains(&value.as_str()), "{name}: {value:?}");
            if value == "true" {
                flags.push(format!("--{long}"));
            }
            continue;
        }
        // Variables that hold lists use the separator of the flag.
        let separator = if name == "EI_ROUTES" { ';' } else { ',' };
        for part in value.split(separator) {
            flags.push(format!("--{long}={part}"));
        }
    }
    flags
}

fn realm() -> Value {
    let text = std::fs::read_to_string(repo().join("realm/event-identity-realm.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `key=value` pairs of a route specification.
fn route(spec: &str) -> HashMap<String, String> {
    spec.split(',')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// The default a script gives one of its variables (`NAME:-value}` or
/// `NAME=value`).
fn script_default(script: &str, name: &str) -> String {
    let text = std::fs::read_to_string(repo().join("scripts").join(script)).unwrap();
    for pattern in [format!("{name}:-"), format!("{name}=")] {
        if let Some(start) = text.find(&pattern) {
            let rest = &text[start + pattern.len()..];
            let end = rest.find(|c: char| c == '}' || c.is_whitespace() || c == '"').unwrap();
            return rest[..end].to_owned();
        }
    }
    panic!("{script} sets no {name}");
}

#[test]
fn the_compose_file_agrees_with_the_binaries_the_realm_and_the_scripts() {
    let compose = compose();
    let (kafka, keycloak, postgres) =
        (service(&compose, "kafka"), service(&compose, "keycloak"), service(&compose, "postgres"));
    let (producer, consumer) = (service(&compose, "producer"), service(&compose, "consumer"));
    let producer_env = environment(producer);
    let consumer_env = environment(consumer);

    // Every setting is known to its binary, with a value it accepts.
    let (mut producer_command, mut consumer_command) =
        (ProducerConfig::command(), ConsumerConfig::command());
    producer_command.build();
    consumer_command.build();
    let producer_flags = flags_from_env(&producer_command, &producer_env);
    let consumer_flags = flags_from_env(&consumer_command, &consumer_env);
    let producer_config = <ProducerConfig as clap::Parser>::try_parse_from(&producer_flags)
        .unwrap_or_else(|e| panic!("producer settings: {e}"));
    let consumer_config = <ConsumerConfig as clap::Parser>::try_parse_from(&consumer_flags)
        .unwrap_or_else(|e| panic!("consumer settings: {e}"));

    // The realm file it mounts exists and is the one the scripts import.
    let volumes = strings(&keycloak["volumes"]);
    let realm_source = volumes[0].split(':').next().unwrap();
    assert_eq!(realm_source, "./realm/event-identity-realm.json");
    assert!(repo().join(realm_source).exists());
    let keycloak_script = std::fs::read_to_string(repo().join("scripts/keycloak.sh")).unwrap();
    assert!(keycloak_script.contains("realm/event-identity-realm.json"));

    // Image versions are the ones the tests run.
    let image = |s: &Yaml| s["image"].as_str().unwrap().rsplit(':').next().unwrap().to_owned();
    assert_eq!(image(kafka), script_default("kafka.sh", "KAFKA_VERSION"));
    assert_eq!(image(keycloak), script_default("keycloak.sh", "EI_KEYCLOAK_VERSION"));
    assert_eq!(image(service(&compose, "topics")), image(kafka));

    // Kafka: both services use the broker's in-network listener.
    let kafka_env = environment(kafka);
    let advertised = &kafka_env["KAFKA_ADVERTISED_LISTENERS"];
    let internal = advertised.split(',').find_map(|l| l.strip_prefix("PLAINTEXT://")).unwrap();
    assert_eq!(producer_config.kafka_bootstrap, internal);
    assert_eq!(consumer_config.kafka_bootstrap, internal);
    let topics_command = strings(&service(&compose, "topics")["command"]).join(" ");
    assert!(topics_command.contains(&format!("--bootstrap-server {internal}")));
    for topic in consumer_config.topics.iter().chain([&consumer_config.dead_letter_topic]) {
        assert!(topics_command.contains(&format!("--topic {topic} ")), "{topic} is not created");
    }
    assert!(consumer_config.topics.contains(&producer_config.topic));

    // Keycloak: tokens name the host address; services fetch in-network.
    let command = strings(&keycloak["command"]);
    let flag = |name: &str| {
        command.iter().find_map(|c| c.strip_prefix(&format!("--{name}="))).unwrap().to_owned()
    };
    let realm = realm();
    let realm_name = realm["realm"].as_str().unwrap();
    let issuer = format!("{}/realms/{realm_name}", flag("hostname"));
    assert_eq!(producer_config.issuer, issuer);
    assert_eq!(consumer_config.issuer, issuer);
    let host_port = flag("hostname").rsplit(':').next().unwrap().to_owned();
    assert!(
        strings(&keycloak["ports"])
            .contains(&format!("127.0.0.1:{host_port}:{}", flag("http-port")))
    );
    let in_network = format!(
        "http://keycloak:{}/realms/{realm_name}/protocol/openid-connect",
        flag("http-port")
    );
    let jwks = format!("{in_network}/certs");
    assert_eq!(producer_config.jwks_url.as_deref(), Some(jwks.as_str()));
    assert_eq!(consumer_config.jwks_url.as_deref(), Some(jwks.as_str()));
    assert_eq!(
        producer_config.token_endpoint.as_deref(),
        Some(format!("{in_network}/token").as_str())
    );

    // The producer's client and the scopes and audience exist in the realm.
    let clients = realm["clients"].as_array().unwrap();
    let client =
        clients.iter().find(|c| c["clientId"] == producer_config.client_id.as_str()).unwrap();
    assert_eq!(client["secret"], producer_env["EI_CLIENT_SECRET"].as_str());
    let scopes: Vec<&str> = realm["clientScopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let produced = route(&producer_env["EI_ROUTES"]);
    let consumed = route(&consumer_env["EI_ROUTES"]);
    assert_eq!(produced["type"], consumed["type"]);
    assert_eq!(produced["scope"], consumed["scope"]);
    assert!(
        scopes.contains(&produced["scope"].as_str())
            && scopes.contains(&produced["requires"].as_str())
    );
    assert_eq!(produced["audience"], consumer_config.audience);
    assert!(clients.iter().any(|c| c["clientId"] == consumer_config.audience.as_str()));

    // Ports: what each service listens on is what it publishes and probes.
    assert_eq!(container_ports(producer), [producer_config.listen.port()]);
    assert!(
        healthcheck(producer)
            .contains(&format!("127.0.0.1:{}/readyz", producer_config.listen.port()))
    );
    assert_eq!(container_ports(consumer), [consumer_config.ops_listen.port()]);
    assert!(
        healthcheck(consumer)
            .contains(&format!("127.0.0.1:{}/readyz", consumer_config.ops_listen.port()))
    );

    // PostgreSQL: the consumer's URL matches the server's user, password and database.
    let pg = environment(postgres);
    let expected = format!(
        "postgres://{}:{}@postgres:{}/{}",
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        container_ports(postgres)[0],
        pg["POSTGRES_DB"]
    );
    assert_eq!(consumer_config.database_url, expected);

    // Each service waits for what it needs.
    let waits = |s: &Yaml| -> Vec<String> {
        s["depends_on"].as_hash().unwrap().keys().map(|k| k.as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(waits(producer), ["kafka", "keycloak"]);
    assert_eq!(waits(consumer), ["topics", "keycloak", "postgres"]);
    for name in ["kafka", "keycloak", "postgres", "producer", "consumer"] {
        assert!(!service(&compose, name)["healthcheck"].is_badvalue(), "{name} has no healthcheck");
    }
}
