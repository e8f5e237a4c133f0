//! PURE: the bytes of one manifest file -> the objects it defines, and a reason for every
//! document that could not be used.
//!
//! What counts as a document follows kubectl: YAML files are split on `---` separator lines
//! the way k8s.io/apimachinery/pkg/util/yaml's YAMLReader does (a line starting with `---`
//! whose remainder is empty or a `#` comment), so a broken document never hides the ones
//! after it; documents that are empty or only comments are skipped, as `kubectl apply` does.
//! JSON files may hold one value or several concatenated values. A `kind: List` (v1) is
//! flattened into its `items`, like kubectl's resource builder does.
use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::model::{Kind, Object};
use crate::source::object::is_namespaced;

/// What one file contributed.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    /// Recognised objects, in file order (a later duplicate overrides an earlier one
    /// downstream).
    pub objects: Vec<Object>,
    /// One human-readable reason per document (or List item) that was skipped.
    pub problems: Vec<String>,
}

/// Is this file a manifest we read? `*.yaml`, `*.yml` or `*.json`, not a dotfile. Editor
/// temp files (`.foo.yaml.swp`, `foo.yaml~`, `#foo.yaml#`, `.#foo.yaml`, vim's `4913`) fail
/// one of the two tests.
pub(crate) fn is_manifest_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with('.') {
        return false;
    }
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Parse one file. Never fails as a whole: every problem is reported per document.
pub(crate) fn parse_file(path: &Path, bytes: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            out.problems.push(format!("not UTF-8 text: {e}"));
            return out;
        }
    };
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
    let documents = if is_json {
        json_documents(text)
    } else {
        yaml_documents(text)
    };
    for (index, doc) in documents.into_iter().enumerate() {
        let label = format!("document {}", index + 1);
        match doc {
            Ok(value) => top_level(&label, value, &mut out),
            Err(e) => out.problems.push(format!("{label}: cannot parse: {e}")),
        }
    }
    out
}

/// Split YAML text into documents on separator lines, parse each on its own. Blank or
/// comment-only documents are dropped (they are not counted in the document index either).
fn yaml_documents(text: &str) -> Vec<Result<Value, String>> {
    let mut chunks: Vec<String> = vec![String::new()];
    for line in text.split_inclusive('\n') {
        if is_separator(line) {
            chunks.push(String::new());
        } else if let Some(last) = chunks.last_mut() {
            last.push_str(line);
        }
    }
    chunks
        .into_iter()
        .filter(|c| {
            c.lines().any(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#') && t != "..."
            })
        })
        .map(|c| serde_yaml::from_str::<Value>(&c).map_err(|e| e.to_string()))
        // A document of just `~` or `null` is empty too.
        .filter(|r| !matches!(r, Ok(Value::Null)))
        .collect()
}

/// `---` at the start of a line, followed by nothing but whitespace or a comment.
fn is_separator(line: &str) -> bool {
    line.strip_prefix("---").is_some_and(|rest| {
        let rest = rest.trim();
        rest.is_empty() || rest.starts_with('#')
    })
}

/// One or more concatenated JSON values. A syntax error ends the file: after it there is no
/// reliable way to find where the next value starts.
fn json_documents(text: &str) -> Vec<Result<Value, String>> {
    let mut docs = Vec::new();
    for item in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        match item {
            Ok(Value::Null) => {}
            Ok(v) => docs.push(Ok(v)),
            Err(e) => {
                docs.push(Err(e.to_string()));
                break;
            }
        }
    }
    docs
}

fn str_field<'a>(value: &'a Value, field: &str) -> Option<&'a str> {
    value.get(field).and_then(Value::as_str)
}

/// A top-level document: a List to flatten, or a single object.
fn top_level(label: &str, value: Value, out: &mut Parsed) {
    if !value.is_object() {
        out.problems.push(format!(
            "{label}: not an object (a YAML/JSON mapping with apiVersion and kind)"
        ));
        return;
    }
    if str_field(&value, "kind") == Some("List") && str_field(&value, "apiVersion") == Some("v1") {
        let Value::Object(mut map) = value else {
            return;
        };
        match map.remove("items") {
            Some(Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    one_object(&format!("{label}, List item {}", i + 1), item, out);
                }
            }
            // `items: null` or missing: an empty list.
            None | Some(Value::Null) => {}
            Some(_) => out
                .problems
                .push(format!("{label}: List: field items: not a sequence")),
        }
        return;
    }
    one_object(label, value, out);
}

/// A single object: recognise apiVersion/kind, deserialize into the typed struct (errors name
/// the field path), default the namespace.
fn one_object(label: &str, value: Value, out: &mut Parsed) {
    let api_version = str_field(&value, "apiVersion").unwrap_or("").to_owned();
    let kind_name = str_field(&value, "kind").unwrap_or("").to_owned();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let namespace = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let what = match &name {
        Some(n) => format!("{label} ({kind_name} {n})"),
        None => format!("{label} ({kind_name})"),
    };
    if !value.is_object() {
        out.problems.push(format!("{label}: not an object"));
        return;
    }
    if kind_name.is_empty() || api_version.is_empty() {
        out.problems
            .push(format!("{what}: apiVersion and kind are required"));
        return;
    }
    let kind = match (api_version.as_str(), kind_name.as_str()) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("networking.k8s.io/v1", "ServiceCIDR") => Kind::ServiceCidr,
        ("v1", "Node") => Kind::Node,
        _ => {
            out.problems.push(format!(
                "{what}: kind {kind_name} ({api_version}) is not used by shunt; skipped"
            ));
            return;
        }
    };
    match name.as_deref() {
        Some(n) if !n.is_empty() => {}
        _ => {
            out.problems
                .push(format!("{what}: field metadata.name: required"));
            return;
        }
    }
    let result = match kind {
        Kind::Service => typed::<Service>(value).map(|o| Object::Service(Box::new(o))),
        Kind::EndpointSlice => {
            typed::<EndpointSlice>(value).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        Kind::ServiceCidr => typed::<ServiceCIDR>(value).map(|o| Object::ServiceCidr(Box::new(o))),
        Kind::Node => typed::<Node>(value).map(|o| Object::Node(Box::new(o))),
    };
    let mut object = match result {
        Ok(o) => o,
        Err(e) => {
            let who = match &namespace {
                Some(ns) if is_namespaced(kind) => format!(
                    "{label} ({kind} {ns}/{})",
                    name.as_deref().unwrap_or_default()
                ),
                _ => what,
            };
            out.problems.push(format!("{who}: {e}"));
            return;
        }
    };
    set_namespace(&mut object, is_namespaced(kind));
    out.objects.push(object);
}

/// Deserialize with the path of the offending field in the error.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path.is_empty() {
            e.into_inner().to_string()
        } else {
            format!("field {path}: {}", e.into_inner())
        }
    })
}

/// A namespaced object without a namespace lands in "default", as `kubectl apply` (without
/// `-n`) puts it; a cluster-scoped object's namespace is meaningless and cleared, as the
/// apiserver ignores it.
fn set_namespace(object: &mut Object, namespaced: bool) {
    let meta = match object {
        Object::Service(o) => &mut o.metadata,
        Object::EndpointSlice(o) => &mut o.metadata,
        Object::ServiceCidr(o) => &mut o.metadata,
        Object::Node(o) => &mut o.metadata,
    };
    if namespaced {
        if meta.namespace.as_deref().is_none_or(str::is_empty) {
            meta.namespace = Some("default".to_owned());
        }
    } else {
        meta.namespace = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::object::object_ref;

    fn parse(name: &str, text: &str) -> Parsed {
        parse_file(Path::new(name), text.as_bytes())
    }

    fn refs(p: &Parsed) -> Vec<String> {
        p.objects
            .iter()
            .map(|o| object_ref(o).to_string())
            .collect()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: prod\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n    protocol: TCP\n";

    #[test]
    fn multi_document_yaml_with_every_kind() {
        let text = format!(
            "# leading comment\n---\n{SVC}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: prod\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\nports:\n- port: 8080\n--- # comment after separator\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs: [10.96.0.0/16]\n---\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  namespace: ignored\nspec:\n  podCIDRs: [10.244.0.0/24]\n...\n"
        );
        let p = parse("a.yaml", &text);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(
            refs(&p),
            [
                "Service prod/web",
                "EndpointSlice prod/web-abc",
                "ServiceCIDR kubernetes",
                "Node node-a"
            ]
        );
        let Object::Service(s) = &p.objects[0] else {
            panic!("not a service")
        };
        assert_eq!(s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 80);
        let Object::Node(n) = &p.objects[3] else {
            panic!("not a node")
        };
        assert_eq!(n.metadata.namespace, None);
    }

    #[test]
    fn separator_needs_line_start_and_nothing_after() {
        assert!(is_separator("---\n"));
        assert!(is_separator("---   \n"));
        assert!(is_separator("--- # x\n"));
        assert!(!is_separator(" ---\n"));
        assert!(!is_separator("--- !tag\n"));
        assert!(!is_separator("----\n"));
    }

    #[test]
    fn list_is_flattened() {
        let text = r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: cm}
- apiVersion: v1
  kind: Service
  metadata: {name: b, namespace: x}
"#;
        let p = parse("l.yml", text);
        assert_eq!(refs(&p), ["Service default/a", "Service x/b"]);
        assert_eq!(p.problems.len(), 1);
        assert!(
            p.problems[0].contains("document 1, List item 2")
                && p.problems[0].contains("ConfigMap")
                && p.problems[0].contains("cm"),
            "{:?}",
            p.problems
        );
    }

    #[test]
    fn json_single_list_and_concatenated() {
        let one = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"j"},"spec":{"ports":[{"port":53,"protocol":"UDP"}]}}"#;
        let p = parse("s.json", one);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(refs(&p), ["Service default/j"]);

        let list = format!(r#"{{"apiVersion":"v1","kind":"List","items":[{one}]}}"#);
        assert_eq!(refs(&parse("l.json", &list)), ["Service default/j"]);

        let two = format!("{one}\n{}", one.replace("\"j\"", "\"k\""));
        assert_eq!(
            refs(&parse("two.json", &two)),
            ["Service default/j", "Service default/k"]
        );

        let broken = format!("{one}\n{{\"apiVersion\": ");
        let p = parse("b.json", &broken);
        assert_eq!(refs(&p), ["Service default/j"]);
        assert_eq!(p.problems.len(), 1);
        assert!(p.problems[0].starts_with("document 2: cannot parse"));
    }

    #[test]
    fn garbage_document_does_not_hide_the_others() {
        let text = format!(
            "{SVC}---\nkey: [unclosed\n  : : :\n---\n{}",
            SVC.replace("web", "api")
        );
        let p = parse("g.yaml", &text);
        assert_eq!(refs(&p), ["Service prod/web", "Service prod/api"]);
        assert_eq!(p.problems.len(), 1);
        assert!(
            p.problems[0].starts_with("document 2: cannot parse"),
            "{:?}",
            p.problems
        );
    }

    #[test]
    fn whole_file_garbage_and_non_objects() {
        let p = parse("g.yaml", "\t\t: [ {\n");
        assert!(p.objects.is_empty());
        assert_eq!(p.problems.len(), 1);

        let p = parse("s.yaml", "just a string\n---\n- a\n- list\n");
        assert!(p.objects.is_empty());
        assert_eq!(p.problems.len(), 2);
        assert!(p.problems[1].starts_with("document 2: not an object"));

        let p = parse_file(Path::new("bin.yaml"), &[0xff, 0xfe, 0x00]);
        assert_eq!(p.problems.len(), 1);
        assert!(p.problems[0].contains("UTF-8"));
    }

    #[test]
    fn unknown_kind_and_wrong_api_version_are_reported() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n---\napiVersion: networking.k8s.io/v1beta1\nkind: ServiceCIDR\nmetadata:\n  name: old\n";
        let p = parse("u.yaml", text);
        assert!(p.objects.is_empty());
        assert_eq!(p.problems.len(), 2);
        assert!(p.problems[0].contains("document 1") && p.problems[0].contains("Deployment"));
        assert!(p.problems[1].contains("document 2") && p.problems[1].contains("v1beta1"));
    }

    #[test]
    fn wrong_types_name_the_object_and_field() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\n  namespace: ns\nspec:\n  ports:\n  - port: eighty\n---\n{SVC}";
        let text = text.replace("{SVC}", SVC);
        let p = parse("w.yaml", &text);
        assert_eq!(refs(&p), ["Service prod/web"]);
        assert_eq!(p.problems.len(), 1);
        let msg = &p.problems[0];
        assert!(msg.contains("Service ns/bad"), "{msg}");
        assert!(msg.contains("spec.ports[0].port"), "{msg}");
    }

    #[test]
    fn missing_name_or_kind() {
        let p = parse(
            "n.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {}\n---\nmetadata: {name: x}\n",
        );
        assert!(p.objects.is_empty());
        assert_eq!(p.problems.len(), 2);
        assert!(p.problems[0].contains("metadata.name"));
        assert!(p.problems[1].contains("apiVersion and kind"));
    }

    #[test]
    fn default_namespace_only_for_namespaced_kinds() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n  namespace: \"\"\naddressType: IPv6\nendpoints: []\n---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\n";
        let p = parse("d.yaml", text);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(
            refs(&p),
            [
                "Service default/a",
                "EndpointSlice default/a-1",
                "ServiceCIDR kubernetes"
            ]
        );
    }

    #[test]
    fn manifest_names() {
        for ok in ["a.yaml", "b.yml", "c.json", "dir/x.yaml"] {
            assert!(is_manifest_name(Path::new(ok)), "{ok}");
        }
        for no in [
            ".a.yaml",
            ".a.yaml.swp",
            "a.yaml~",
            "#a.yaml#",
            ".#a.yaml",
            "4913",
            "a.txt",
            "yaml",
        ] {
            assert!(!is_manifest_name(Path::new(no)), "{no}");
        }
    }
}
