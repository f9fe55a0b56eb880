//! The access key signature Apollo checks when an app has a secret: `Authorization: Apollo
//! {appId}:{signature}` and `Timestamp`, where the signature is the base64 of the HMAC-SHA1 of
//! `timestamp + "\n" + path?query` keyed with the secret.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The signature of one request: `path_with_query` is the request target as sent.
pub fn signature(timestamp_ms: u64, path_with_query: &str, secret: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{timestamp_ms}\n{path_with_query}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The two headers of a signed request.
pub fn headers(app_id: &str, timestamp_ms: u64, path_with_query: &str, secret: &str) -> String {
    format!(
        "Authorization: Apollo {app_id}:{}\r\nTimestamp: {timestamp_ms}\r\n",
        signature(timestamp_ms, path_with_query, secret)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector of the Java client's `SignatureTest`.
    #[test]
    fn matches_the_java_clients_vector() {
        assert_eq!(
            signature(
                1576478257344,
                "/configs/100004458/default/application?ip=10.0.0.1",
                "df23df3f59884980844ff3dada30fa97"
            ),
            "EoKyziXvKqzHgwx+ijDJwgVTDgE="
        );
    }

    #[test]
    fn headers_name_the_app() {
        let h = headers(
            "100004458",
            1576478257344,
            "/configs/100004458/default/application?ip=10.0.0.1",
            "df23df3f59884980844ff3dada30fa97",
        );
        assert_eq!(
            h,
            "Authorization: Apollo 100004458:EoKyziXvKqzHgwx+ijDJwgVTDgE=\r\nTimestamp: 1576478257344\r\n"
        );
    }
}
