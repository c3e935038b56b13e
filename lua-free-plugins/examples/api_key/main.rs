//! Running a third-party plugin: register it next to the built-ins, build
//! a chain from YAML (as the gateway does at load), and push a request
//! through its hooks. `cargo run -p lua-free-plugins --example api_key`.
//!
//! In a gateway binary the same registry goes to
//! `gateway::config::load_file_with(path, &registry)` (see docs/PLUGINS.md).

mod plugin;

use std::sync::Arc;
use std::time::Duration;

use lua_free_plugins::{
    build_chain, from_yaml, Chain, LogSummary, PluginBuilder, PluginCtx, Registry, RequestHeader,
};

const CHAIN: &str = r#"
- api-key:
    consumers: { mobile-app: "k-2f9c1e", partner-a: "k-77d0aa" }
- headers: { response: { set: { x-served-by: tiergate } } }
"#;

fn main() -> Result<(), String> {
    let mut registry = Registry::with_builtins();
    registry.register::<plugin::ApiKey>();
    let list = serde_yaml_ng::from_str(CHAIN).map_err(|e| e.to_string())?;
    let chain = build_chain(&registry, &list).map_err(|errors| format!("{errors:?}"))?;
    println!("chain: {:?}", chain.names());

    for key in ["k-77d0aa", "wrong-key"] {
        let mut req = RequestHeader::build("GET", b"/orders", None).map_err(|e| e.to_string())?;
        req.insert_header("x-api-key", key)
            .map_err(|e| e.to_string())?;
        let mut ctx = PluginCtx::new("orders".into());
        match chain.request(&mut req, &mut ctx) {
            Some(answer) => println!(
                "{key}: answered {} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            ),
            None => println!(
                "{key}: proxied with x-consumer={:?}, x-api-key removed: {}",
                req.headers.get("x-consumer"),
                req.headers.get("x-api-key").is_none()
            ),
        }
    }
    // Built by hand, the plugin stays reachable: its `log` hook counts.
    let config =
        serde_yaml_ng::from_str("consumers: { partner-a: k-77d0aa }").map_err(|e| e.to_string())?;
    let api_key = Arc::new(plugin::ApiKey::build(
        from_yaml(&config).map_err(|e| e.to_string())?,
    )?);
    let chain = Chain::new(vec![api_key.clone()]);
    let mut req = RequestHeader::build("GET", b"/orders", None).map_err(|e| e.to_string())?;
    req.insert_header("x-api-key", "k-77d0aa")
        .map_err(|e| e.to_string())?;
    let mut ctx = PluginCtx::new("orders".into());
    if chain.request(&mut req, &mut ctx).is_none() {
        let summary = LogSummary {
            status: 200,
            duration: Duration::from_millis(3),
            answered_by_plugin: false,
        };
        chain.log(&summary, &mut ctx);
    }
    println!("partner-a served: {}", api_key.served("partner-a"));
    // A config mistake is caught at load, with its place.
    let bad = serde_yaml_ng::from_str("- api-key: { consumer: {} }").map_err(|e| e.to_string())?;
    if let Err(errors) = build_chain(&registry, &bad) {
        println!("bad config: {}", errors[0]);
    }
    Ok(())
}
