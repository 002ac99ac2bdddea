//! The demo's scenario on the embedded mock cluster and the development
//! issuer, as `cargo run -p event-identity-demo` plays it: needs no
//! external service, so it runs in every `cargo test --workspace`.

use event_identity_demo::summary::ConsumerCounts;
use event_identity_demo::{DemoOptions, Summary};

const ALICE: &str = "11111111-1111-4111-8111-111111111111";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_demo_counts_every_outcome_exactly() {
    let summary = event_identity_demo::run(&DemoOptions::embedded()).await.expect("the demo runs");
    assert!(summary.setup.issuer_is_stand_in);
    assert!(summary.setup.broker_is_embedded);

    // At the producer: three 202s (one a retry under the same message ID),
    // and bob refused with 403.
    assert_eq!(summary.accepted(), 3);
    assert_eq!(summary.accepted_ids().len(), 2);
    assert_eq!(summary.requests[0].message_id, summary.requests[1].message_id);
    let refused: Vec<_> =
        summary.refused().iter().map(|r| (r.user.as_str(), r.status, r.code.clone())).collect();
    assert_eq!(refused, [("bob", 403, Some("forbidden".to_owned()))]);

    // At the consumer: five records; two effects, one duplicate suppressed,
    // two dead-lettered with exactly the expected reasons.
    assert_eq!(summary.records(), 5);
    let counts = ConsumerCounts { consumed: 5, processed: 2, duplicates: 1, dead_lettered: 2 };
    assert_eq!(summary.consumer, counts);
    assert_eq!(summary.dead_letter_reasons(), ["expired", "invalid_signature"]);
    for record in &summary.injected {
        let id = record.message_id.to_string();
        let letter = summary.dead_letters.iter().find(|d| d.message_id.as_deref() == Some(&id));
        let letter = letter.unwrap_or_else(|| panic!("{id} is not in the dead-letter topic"));
        assert_eq!(letter.reason, record.expected_reason);
        assert_eq!(letter.source_offset, Some(record.offset));
    }
    assert!(summary.skipped.is_empty(), "{:?}", summary.skipped);

    // The identity each effect ran under came from its verified token.
    let identities: Vec<_> = summary
        .processed
        .iter()
        .map(|e| (e.order.as_str(), e.subject.as_str(), e.user.as_deref(), e.tenant.as_deref()))
        .collect();
    assert_eq!(
        identities,
        [
            ("order-1", ALICE, Some("alice"), Some("acme")),
            ("order-2", ALICE, Some("alice"), Some("acme"))
        ]
    );
    assert!(summary.processed.iter().all(|e| e.token_id.is_some()));

    assert_eq!(summary.surprises(), Vec::<String>::new());
    let printed = summary.to_string();
    assert!(printed.contains("Every step ended as expected"), "{printed}");
    assert!(printed.contains("STAND-IN"), "{printed}");
    assert!(!printed.contains("eyJ"), "a token was printed:\n{printed}");
    assert_surprises_are_caught(summary);
}

/// The summary's own check notices a pipeline that misbehaves.
fn assert_surprises_are_caught(summary: Summary) {
    let mut forged_processed = summary.clone();
    forged_processed.dead_letters.remove(0);
    assert_eq!(forged_processed.surprises().len(), 2, "{:?}", forged_processed.surprises());

    let mut wrong_reason = summary.clone();
    wrong_reason.dead_letters[0].reason = "unknown_key".to_owned();
    assert_eq!(wrong_reason.surprises().len(), 1, "{:?}", wrong_reason.surprises());

    let mut twice = summary;
    twice.consumer.duplicates = 0;
    assert_eq!(twice.surprises().len(), 1, "{:?}", twice.surprises());
}
