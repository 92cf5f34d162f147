//! The Events the agent publishes on a Service whose port its datapath refuses
//! (refusals::ServiceEvents), as the API server receives them (tests/fake_api).

#[expect(
    dead_code,
    reason = "the fake API's fault injection serves kube_source.rs; here it only takes Events"
)]
mod fake_api;

use fake_api::{FakeApi, guard};
use k8s_openapi::api::core::v1::Service;
use nodeport_agent::{
    model::{Protocol, ServicePortKey},
    refusals::ServiceEvents,
};
use serde_json::json;

#[tokio::test]
async fn a_refused_port_and_its_recovery_are_events_on_the_service() {
    let api = FakeApi::start().await;
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "shop", "name": "web", "uid": "5c1e-77"},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    let key = ServicePortKey {
        namespace: "shop".into(),
        name: "web".into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
    };
    let events = ServiceEvents::new(api.client(), "node-1");
    let message = "1100 backends take new connections but a Maglev table has 1021 slots";
    guard("the Warning", events.publish(&service, &key, Some(message)))
        .await
        .unwrap();
    guard("the Normal", events.publish(&service, &key, None))
        .await
        .unwrap();

    let sent = api.events();
    assert_eq!(sent.len(), 2, "{sent:#?}");
    let (refused, programmed) = (&sent[0], &sent[1]);
    assert_eq!(refused["type"], "Warning");
    assert_eq!(refused["reason"], "ServicePortRefused");
    assert_eq!(refused["action"], "Program");
    assert_eq!(refused["reportingController"], "nodeport-agent");
    assert_eq!(refused["reportingInstance"], "node-1");
    assert_eq!(refused["metadata"]["namespace"], "shop");
    let regarding = &refused["regarding"];
    assert_eq!(
        (
            &regarding["kind"],
            &regarding["namespace"],
            &regarding["name"],
            &regarding["uid"]
        ),
        (
            &json!("Service"),
            &json!("shop"),
            &json!("web"),
            &json!("5c1e-77")
        )
    );
    let note = refused["note"].as_str().unwrap();
    assert!(
        note.contains("shop/web:http/TCP") && note.contains(message),
        "{note}"
    );
    assert_eq!(programmed["type"], "Normal");
    assert_eq!(programmed["reason"], "ServicePortProgrammed");
    // Events go to the Service's namespace.
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.method == axum::http::Method::POST)
            .all(|r| r.path == "/apis/events.k8s.io/v1/namespaces/shop/events"),
        "{:?}",
        api.requests()
    );
}
