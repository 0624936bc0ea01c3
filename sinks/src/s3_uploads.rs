//! Listing incomplete multipart uploads on S3 (`ListMultipartUploads`), which
//! `object_store` does not offer. Recovery needs it: an upload created just before a
//! crash, before its marker object was written, is known only to the server.

use exactly_engine::error::{Error, Result};
use object_store::aws::{AmazonS3, AwsAuthorizer};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::ClientOptions;
use std::sync::Arc;

/// Lists the multipart uploads of one bucket, signed with the store's credentials.
pub(crate) struct UploadLister {
    store: Arc<AmazonS3>,
    client: HttpClient,
    base: String,
    region: String,
}

fn err(message: String) -> Error {
    Error::Sink {
        sink: exactly_engine::ids::OperatorId("object-store".into()),
        step: "recover",
        checkpoint: None,
        source: message.into(),
    }
}

impl UploadLister {
    /// For `bucket`, with the endpoint and region from the AWS environment variables.
    pub(crate) fn from_env(store: Arc<AmazonS3>, bucket: &str) -> Result<Self> {
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| "us-east-1".into());
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .unwrap_or_else(|_| format!("https://s3.{region}.amazonaws.com"));
        let client = ReqwestConnector {}
            .connect(&ClientOptions::new().with_allow_http(endpoint.starts_with("http://")))
            .map_err(|e| err(format!("S3 client: {e}")))?;
        Ok(UploadLister {
            store,
            client,
            base: format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            region,
        })
    }

    /// `(key, upload id)` of every incomplete upload whose key starts with `prefix`.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| err(format!("S3 credentials: {e}")))?;
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut url = format!("{}?uploads&prefix={}", self.base, encode(prefix));
            if let Some((key, id)) = &markers {
                url.push_str(&format!(
                    "&key-marker={}&upload-id-marker={}",
                    encode(key),
                    encode(id)
                ));
            }
            let mut request = http::Request::builder()
                .method("GET")
                .uri(&url)
                .body(HttpRequestBody::empty())
                .map_err(|e| err(format!("ListMultipartUploads request: {e}")))?;
            AwsAuthorizer::new(&credential, "s3", &self.region)
                .try_authorize(&mut request, None)
                .map_err(|e| err(format!("signing ListMultipartUploads: {e}")))?;
            let response = self
                .client
                .execute(request)
                .await
                .map_err(|e| err(format!("ListMultipartUploads: {e}")))?;
            let status = response.status();
            let body = response
                .into_body()
                .bytes()
                .await
                .map_err(|e| err(format!("ListMultipartUploads: {e}")))?;
            let text = String::from_utf8_lossy(&body);
            if !status.is_success() {
                return Err(err(format!("ListMultipartUploads: HTTP {status}: {text}")));
            }
            for upload in elements(&text, "Upload") {
                if let (Some(key), Some(id)) = (element(upload, "Key"), element(upload, "UploadId"))
                {
                    out.push((unescape(key), unescape(id)));
                }
            }
            if element(&text, "IsTruncated") != Some("true") {
                return Ok(out);
            }
            match (
                element(&text, "NextKeyMarker"),
                element(&text, "NextUploadIdMarker"),
            ) {
                (Some(k), Some(i)) => markers = Some((unescape(k), unescape(i))),
                _ => return Ok(out),
            }
        }
    }
}

/// Percent-encode a query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The contents of every `<tag>...</tag>` in `xml`.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    elements(xml, tag).into_iter().next()
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uploads_and_pagination() {
        let xml = "<ListMultipartUploadsResult><IsTruncated>true</IsTruncated>\
            <NextKeyMarker>a&amp;b</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>\
            <Upload><Key>p/part-1</Key><UploadId>u1</UploadId></Upload>\
            <Upload><Key>a&amp;b</Key><UploadId>u2</UploadId></Upload></ListMultipartUploadsResult>";
        let ups: Vec<(String, String)> = elements(xml, "Upload")
            .into_iter()
            .map(|u| {
                (
                    unescape(element(u, "Key").unwrap()),
                    unescape(element(u, "UploadId").unwrap()),
                )
            })
            .collect();
        assert_eq!(
            ups,
            vec![
                ("p/part-1".to_string(), "u1".to_string()),
                ("a&b".to_string(), "u2".to_string())
            ]
        );
        assert_eq!(element(xml, "IsTruncated"), Some("true"));
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
