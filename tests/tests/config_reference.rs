//! The configuration reference lists every setting of both binaries, with
//! its environment variable and default, as `--help` states them.

use clap::CommandFactory as _;
use event_identity_consumer::ConsumerConfig;
use event_identity_producer::ProducerConfig;

#[test]
fn docs_configuration_md_lists_every_setting_with_its_variable_and_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let doc = std::fs::read_to_string(path).unwrap();
    for command in [ProducerConfig::command(), ConsumerConfig::command()] {
        // The binary's own section, up to the next one.
        let heading = format!("## {}", command.get_name());
        let start = doc.find(&heading).unwrap_or_else(|| panic!("no section {heading}"));
        let section = &doc[start + heading.len()..];
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version"].contains(&long) {
                continue;
            }
            let row = section
                .lines()
                .find(|l| l.starts_with(&format!("| `--{long}` |")))
                .unwrap_or_else(|| panic!("{} --{long} is not in {path}", command.get_name()));
            let env = arg.get_env().unwrap().to_str().unwrap();
            assert!(row.contains(&format!("`{env}`")), "{row}");
            for default in arg.get_default_values() {
                let default = default.to_str().unwrap();
                if default == "false" {
                    // A switch: documented as off.
                    assert!(row.contains("| off |"), "{row}");
                    continue;
                }
                assert!(row.contains(&format!("`{default}`")), "default {default}: {row}");
            }
        }
    }
}
