//! Helpers shared by the sources: the identity and a canonical serialized form of an `Object`.
use crate::model::{Kind, Object, ObjectRef};

/// The `ObjectRef` of an object: kind, namespace ("" for cluster-scoped kinds) and name.
pub(crate) fn object_ref(object: &Object) -> ObjectRef {
    let (kind, meta) = match object {
        Object::Service(o) => (Kind::Service, &o.metadata),
        Object::EndpointSlice(o) => (Kind::EndpointSlice, &o.metadata),
        Object::ServiceCidr(o) => (Kind::ServiceCidr, &o.metadata),
        Object::Node(o) => (Kind::Node, &o.metadata),
    };
    ObjectRef {
        kind,
        // ServiceCIDR and Node are cluster-scoped: their namespace is always "".
        namespace: if is_namespaced(kind) {
            meta.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Service and EndpointSlice live in a namespace; ServiceCIDR and Node do not.
pub(crate) fn is_namespaced(kind: Kind) -> bool {
    matches!(kind, Kind::Service | Kind::EndpointSlice)
}

/// A canonical serialized form, to tell a real change from a rewrite of the same content.
/// serde_json writes struct fields in declaration order and k8s-openapi's maps are BTreeMaps,
/// so equal objects serialize identically.
pub(crate) fn canonical(object: &Object) -> String {
    let r = match object {
        Object::Service(o) => serde_json::to_string(o),
        Object::EndpointSlice(o) => serde_json::to_string(o),
        Object::ServiceCidr(o) => serde_json::to_string(o),
        Object::Node(o) => serde_json::to_string(o),
    };
    // Serializing these plain data types cannot fail (no non-string map keys, no custom
    // serializers that error); fall back to Debug rather than panic if it ever did.
    r.unwrap_or_else(|e| format!("{e}: {object:?}"))
}
