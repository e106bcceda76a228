//! The stdio framing layer (SPEC §14, first bullet): every request that carries an id gets an
//! answer. rmcp's own stdio transport drops a line it cannot decode (invalid UTF-8, a lone
//! surrogate escape, unparseable JSON) and buffers a line of any length, so the client waits
//! forever. Here lines are read as bytes up to a size limit, decoded lossily (invalid UTF-8 and
//! lone surrogates become U+FFFD), and what is still not a JSON-RPC message is answered here
//! with -32700 or -32600; good messages go on to rmcp unchanged.

use std::borrow::Cow;
use std::sync::Arc;

use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::service::RoleServer;
use rmcp::transport::Transport;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Mutex};

/// The longest request line accepted (16 MiB); `SORTIE_MAX_REQUEST_BYTES` changes it.
pub const DEFAULT_MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// How much of an over-size line's start and end is kept to find its id.
const ID_WINDOW: usize = 8 * 1024;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;

type Writer = Arc<Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

/// A line-delimited JSON-RPC transport over any reader and writer (stdin and stdout in
/// `sortie-mcp`).
pub struct LineTransport {
    incoming: mpsc::Receiver<ClientJsonRpcMessage>,
    writer: Writer,
}

impl LineTransport {
    /// Starts reading `reader` on a task of its own; must be called inside a Tokio runtime.
    pub fn new(
        reader: impl AsyncRead + Send + Unpin + 'static,
        writer: impl AsyncWrite + Send + Unpin + 'static,
        max_line_bytes: usize,
    ) -> LineTransport {
        let writer: Writer = Arc::new(Mutex::new(Box::new(writer)));
        let (tx, incoming) = mpsc::channel(64);
        tokio::spawn(read_lines(reader, writer.clone(), tx, max_line_bytes));
        LineTransport { incoming, writer }
    }

    /// stdin and stdout, with the limit `SORTIE_MAX_REQUEST_BYTES` sets
    /// (`config::Env::max_request_bytes`).
    pub fn stdio(max_line_bytes: usize) -> LineTransport {
        LineTransport::new(tokio::io::stdin(), tokio::io::stdout(), max_line_bytes)
    }
}

impl Transport<RoleServer> for LineTransport {
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: ServerJsonRpcMessage,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send + 'static {
        let writer = self.writer.clone();
        async move {
            let line = serde_json::to_vec(&item).map_err(std::io::Error::other)?;
            write_line(&writer, line).await
        }
    }

    fn receive(
        &mut self,
    ) -> impl std::future::Future<Output = Option<ClientJsonRpcMessage>> + Send {
        self.incoming.recv()
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.incoming.close();
        Ok(())
    }
}

async fn write_line(writer: &Writer, mut line: Vec<u8>) -> std::io::Result<()> {
    line.push(b'\n');
    let mut w = writer.lock().await;
    w.write_all(&line).await?;
    w.flush().await
}

async fn read_lines(
    reader: impl AsyncRead + Send + Unpin,
    writer: Writer,
    tx: mpsc::Sender<ClientJsonRpcMessage>,
    max_line_bytes: usize,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut line: Vec<u8> = Vec::new();
    // Once a line is over the limit only its length and its last bytes are kept.
    let mut size: usize = 0;
    let mut tail: Vec<u8> = Vec::new();
    let mut over = false;
    loop {
        let (chunk_len, ended) = match reader.fill_buf().await {
            Ok([]) => (0, true),
            Ok(buf) => {
                let (part, newline) = match buf.iter().position(|b| *b == b'\n') {
                    Some(i) => (&buf[..i], true),
                    None => (buf, false),
                };
                size += part.len();
                if size <= max_line_bytes {
                    line.extend_from_slice(part);
                } else {
                    if !over {
                        // First chunk past the limit: keep the start and end for the id only.
                        over = true;
                        tail.extend_from_slice(&line[line.len().saturating_sub(ID_WINDOW)..]);
                        line.truncate(ID_WINDOW);
                    }
                    tail.extend_from_slice(part);
                    if tail.len() > ID_WINDOW {
                        tail.drain(..tail.len() - ID_WINDOW);
                    }
                }
                let consumed = part.len() + usize::from(newline);
                (consumed, newline)
            }
            Err(e) => {
                tracing::warn!("reading stdin failed: {e}");
                break;
            }
        };
        let at_eof = chunk_len == 0;
        reader.consume(chunk_len);
        if ended {
            let finished = std::mem::take(&mut line);
            let finished_tail = std::mem::take(&mut tail);
            let finished_size = std::mem::replace(&mut size, 0);
            over = false;
            if finished_size > max_line_bytes {
                let id = find_id(&finished).or_else(|| find_id_last(&finished_tail));
                answer(
                    &writer,
                    id,
                    INVALID_REQUEST,
                    format!(
                        "request too large: the line is {finished_size} bytes, the limit is {max_line_bytes} bytes ({})",
                        human_size(max_line_bytes)
                    ),
                )
                .await;
            } else if !finished.iter().all(u8::is_ascii_whitespace) {
                if let Some(message) = decode(&writer, &finished).await {
                    if tx.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        if at_eof {
            break;
        }
    }
}

fn human_size(bytes: usize) -> String {
    if bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else if bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

/// One line to a message for rmcp, or an error answered here (None).
async fn decode(writer: &Writer, bytes: &[u8]) -> Option<ClientJsonRpcMessage> {
    let text = String::from_utf8_lossy(bytes);
    let text = replace_lone_surrogates(&text);
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            answer(
                writer,
                find_id(text.as_bytes()),
                PARSE_ERROR,
                format!("parse error: the line is not JSON ({e})"),
            )
            .await;
            return None;
        }
    };
    let id = value
        .get("id")
        .filter(|id| id.is_string() || id.is_i64() || id.is_u64())
        .cloned();
    let is_request = value.get("method").is_some_and(Value::is_string);
    let problem = if !value.is_object() {
        Some("a JSON-RPC message must be a JSON object".to_string())
    } else if value.get("jsonrpc") != Some(&json!("2.0")) {
        Some("\"jsonrpc\" must be \"2.0\"".to_string())
    } else if value.get("id").is_some_and(|v| !v.is_null()) && id.is_none() {
        Some("\"id\" must be a string or an integer".to_string())
    } else if !is_request && value.get("result").is_none() && value.get("error").is_none() {
        Some("a request needs a string \"method\"".to_string())
    } else {
        None
    };
    if let Some(problem) = problem {
        // A notification (a method and no id) is never answered; anything else is.
        let notification = is_request && value.get("id").is_none();
        if !notification {
            answer(
                writer,
                id,
                INVALID_REQUEST,
                format!("invalid request: {problem}"),
            )
            .await;
        }
        return None;
    }
    match serde_json::from_value::<ClientJsonRpcMessage>(value) {
        Ok(message) => Some(message),
        Err(e) => {
            if is_request && id.is_some() {
                answer(writer, id, INVALID_REQUEST, format!("invalid request: {e}")).await;
            } else {
                tracing::warn!("dropped a notification or response that does not decode: {e}");
            }
            None
        }
    }
}

async fn answer(writer: &Writer, id: Option<Value>, code: i64, message: String) {
    let reply = json!({
        "jsonrpc": "2.0",
        "id": id.unwrap_or(Value::Null),
        "error": {"code": code, "message": message},
    });
    if let Err(e) = write_line(writer, reply.to_string().into_bytes()).await {
        tracing::warn!("writing an error answer failed: {e}");
    }
}

/// The id of a message whose text does not parse: the first `"id": <number or string>` (ids
/// usually come first), as a JSON value.
fn find_id(bytes: &[u8]) -> Option<Value> {
    id_candidates(bytes).into_iter().next()
}

/// The last `"id": …` of a message's end (some clients write the id last).
fn find_id_last(bytes: &[u8]) -> Option<Value> {
    id_candidates(bytes).into_iter().last()
}

fn id_candidates(bytes: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(bytes);
    let mut found = Vec::new();
    let mut rest: &str = &text;
    while let Some(at) = rest.find("\"id\"") {
        rest = &rest[at + 4..];
        let after = rest.trim_start();
        let Some(after) = after.strip_prefix(':') else {
            continue;
        };
        let after = after.trim_start();
        let mut stream = serde_json::Deserializer::from_str(after).into_iter::<Value>();
        if let Some(Ok(v)) = stream.next() {
            if v.is_string() || v.is_i64() || v.is_u64() {
                found.push(v);
            }
        } else if let Some(end) = after.find(|c: char| !(c.is_ascii_digit() || c == '-')) {
            // A number followed by something that does not parse as the rest of the stream.
            if let Ok(n) = after[..end].parse::<i64>() {
                found.push(json!(n));
            }
        }
    }
    found
}

/// JSON text with every `\uD800`–`\uDFFF` escape that is not part of a surrogate pair replaced
/// by `\uFFFD` (what a JavaScript client writes when it cuts a string inside an emoji). serde_json
/// refuses such escapes, and the request would otherwise go unanswered.
pub fn replace_lone_surrogates(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    if !text.contains("\\u") {
        return Cow::Borrowed(text);
    }
    let hex_at = |i: usize| -> Option<u16> {
        let digits = bytes.get(i..i + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2; // any other escape, `\\` included, is two characters
            continue;
        }
        let Some(unit) = hex_at(i + 2) else {
            i += 2;
            continue;
        };
        let high = (0xD800..0xDC00).contains(&unit);
        let low = (0xDC00..0xE000).contains(&unit);
        if high
            && bytes.get(i + 6) == Some(&b'\\')
            && bytes.get(i + 7) == Some(&b'u')
            && hex_at(i + 8).is_some_and(|next| (0xDC00..0xE000).contains(&next))
        {
            i += 12; // a proper pair
            continue;
        }
        if high || low {
            out.push_str(&text[copied..i]);
            out.push_str("\\uFFFD");
            copied = i + 6;
        }
        i += 6;
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lone_surrogates_become_replacement_characters_and_pairs_stay() {
        assert_eq!(replace_lone_surrogates(r#""a\ud83d""#), r#""a\uFFFD""#);
        assert_eq!(replace_lone_surrogates(r#""\ude00x""#), r#""\uFFFDx""#);
        assert_eq!(
            replace_lone_surrogates(r#""\ud83d\ude00""#),
            r#""\ud83d\ude00""#
        );
        assert_eq!(replace_lone_surrogates(r#""\\ud83d""#), r#""\\ud83d""#);
        assert_eq!(
            replace_lone_surrogates(r#""\ud83d\u0041""#),
            r#""\uFFFD\u0041""#
        );
        let v: Value =
            serde_json::from_str(&replace_lone_surrogates(r#"{"g":"x\ud83d"}"#)).unwrap();
        assert_eq!(v["g"], "x\u{FFFD}");
    }

    #[test]
    fn ids_are_found_in_lines_that_do_not_parse() {
        assert_eq!(
            find_id(br#"{"jsonrpc":"2.0","id":7,"method":"x","params":{"#),
            Some(json!(7))
        );
        assert_eq!(find_id(br#"{"id": "abc", "method""#), Some(json!("abc")));
        assert_eq!(
            find_id_last(br#"aaaa"}},"jsonrpc":"2.0","id":12}"#),
            Some(json!(12))
        );
        assert_eq!(find_id(b"garbage"), None);
    }
}
