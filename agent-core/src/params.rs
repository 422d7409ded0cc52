//! The `X-API-Tunnel-Params` header: standard padded base64 of compact JSON, byte for byte what
//! Rancher's Go agent sends (spec §4.2, §4.3).
//!
//! Go marshals the params as a `map[string]interface{}`, so object keys come out sorted by
//! byte value; `serde_json::Value` (without `preserve_order`) keeps objects in a `BTreeMap` and
//! writes them sorted the same way. Go's encoder also escapes `<`, `>`, `&`, U+2028 and U+2029
//! inside strings (`\u003c`, …); serde_json does not, so [`go_json`] rewrites them. Those
//! characters cannot appear in JSON outside strings, so a textual rewrite is exact.

use serde_json::Value;

/// Name of the token header.
pub const TOKEN_HEADER: &str = "X-API-Tunnel-Token";
/// Name of the params header.
pub const PARAMS_HEADER: &str = "X-API-Tunnel-Params";

/// Compact JSON as Go's `json.Marshal` writes it: sorted keys, HTML-safe escapes.
pub fn go_json(value: &Value) -> String {
    let compact = value.to_string();
    if !compact.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return compact;
    }
    let mut out = String::with_capacity(compact.len() + 16);
    for c in compact.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// The header value: standard padded base64 of [`go_json`].
pub fn encode_params(value: &Value) -> String {
    data_encoding::BASE64.encode(go_json(value).as_bytes())
}

/// Decodes a header value back to JSON (for tests and logs).
pub fn decode_params(header: &str) -> Result<Value, String> {
    let bytes = data_encoding::BASE64
        .decode(header.as_bytes())
        .map_err(|e| format!("base64: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("json: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cluster_params_match_go_bytes() {
        // The shape of spec §4.2, with keys given out of order on purpose.
        let v = json!({"cluster": {"token": "t", "caCert": "Y2E=", "address": "10.43.0.1:443"}});
        let s = go_json(&v);
        assert_eq!(
            s,
            r#"{"cluster":{"address":"10.43.0.1:443","caCert":"Y2E=","token":"t"}}"#
        );
        // printf '%s' "$s" | base64 -w0
        assert_eq!(
            encode_params(&v),
            "eyJjbHVzdGVyIjp7ImFkZHJlc3MiOiIxMC40My4wLjE6NDQzIiwiY2FDZXJ0IjoiWTJFPSIsInRva2VuIjoidCJ9fQ=="
        );
        assert_eq!(decode_params(&encode_params(&v)).unwrap(), v);
    }

    #[test]
    fn html_characters_are_escaped_like_go() {
        let v = json!({"k": "a<b>&c\u{2028}"});
        assert_eq!(go_json(&v), r#"{"k":"a\u003cb\u003e\u0026c\u2028"}"#);
    }
}
