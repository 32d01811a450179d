//! The protobuf codec of the generated service and client (`build.rs` names it): prost's encoder as is, and
//! a decoder that answers a message that does not decode with `InvalidArgument` naming the
//! message and field (`invalid SubmitTaskRequest.task_type: not valid UTF-8`). tonic's own
//! codec answers `Internal` with the decoder's text, which is neither the client's fault code
//! nor a message meant for it.

use std::{fmt, marker::PhantomData};

use prost::{DecodeError, Message};
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;
use tracing::debug;

/// Encodes `T` and decodes `U` with prost.
pub struct ProtoCodec<T, U> {
    _types: PhantomData<fn(T) -> U>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self { _types: PhantomData }
    }
}

impl<T, U> fmt::Debug for ProtoCodec<T, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProtoCodec")
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder { _type: PhantomData }
    }
}

/// Decodes `U`; a decode error becomes `InvalidArgument` (see [`refusal`]).
pub struct ProtoDecoder<U> {
    _type: PhantomData<fn() -> U>,
}

impl<U> fmt::Debug for ProtoDecoder<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProtoDecoder")
    }
}

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| {
            let message = short_type_name::<U>();
            debug!(%error, message, "refused a message that does not decode");
            Status::invalid_argument(refusal(&error, message))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// `SubmitTaskRequest` for `coordinator::proto::SubmitTaskRequest`.
fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

/// The answer to a message of type `message` that failed to decode: the field path when prost
/// names one (`invalid SubmitTasksRequest.tasks.task_type: not valid UTF-8`), otherwise
/// `malformed SubmitTaskRequest: ...`. Only prost's fixed descriptions of the wire bytes are
/// passed on; anything else is summed up as "not a valid protobuf encoding".
pub fn refusal(error: &DecodeError, message: &str) -> String {
    // prost offers no accessors: its text is "failed to decode Protobuf message: " then a
    // `Message.field: ` pair per level, innermost first, then the description.
    let text = error.to_string();
    let mut rest = text.strip_prefix("failed to decode Protobuf message: ").unwrap_or(&text);
    let mut stack = Vec::new();
    while let Some((head, tail)) = rest.split_once(": ") {
        match head.split_once('.') {
            Some((msg, field)) if is_ident(msg) && is_ident(field) => {
                stack.push((msg, field));
                rest = tail;
            }
            _ => break,
        }
    }
    let reason = reason(rest);
    let mut levels = stack.iter().rev();
    match levels.next() {
        None => format!("malformed {message}: {reason}"),
        Some((outer, field)) => {
            let mut path = format!("{outer}.{field}");
            for (_, field) in levels {
                path.push('.');
                path.push_str(field);
            }
            format!("invalid {path}: {reason}")
        }
    }
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// prost's description of what is wrong with the bytes, in the client's terms.
fn reason(description: &str) -> &str {
    /// prost's descriptions of malformed wire bytes, passed on as they are.
    const WIRE: [&str; 9] = [
        "length delimiter exceeds maximum usize value",
        "invalid varint",
        "recursion limit reached",
        "invalid wire type",
        "invalid key value",
        "invalid tag value",
        "buffer underflow",
        "delimited length exceeded",
        "unexpected end group tag",
    ];
    if description.starts_with("invalid string value") {
        "not valid UTF-8"
    } else if WIRE.iter().any(|w| description.starts_with(w)) {
        description
    } else {
        "not a valid protobuf encoding"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate as proto;

    fn refused<U: Message + Default + std::fmt::Debug>(bytes: &[u8]) -> String {
        let error = U::decode(bytes).expect_err("the bytes do not decode");
        refusal(&error, short_type_name::<U>())
    }

    #[test]
    fn invalid_utf8_names_the_message_and_field() {
        // Field 1 (task_type), length-delimited, 2 bytes that are not UTF-8.
        let m = refused::<proto::SubmitTaskRequest>(&[0x0a, 0x02, 0xff, 0xfe]);
        assert_eq!(m, "invalid SubmitTaskRequest.task_type: not valid UTF-8");
        let m = refused::<proto::RegisterWorkerRequest>(&[0x0a, 0x01, 0xc3]);
        assert_eq!(m, "invalid RegisterWorkerRequest.worker_id: not valid UTF-8");
    }

    #[test]
    fn a_nested_field_is_named_from_the_outer_message() {
        // SubmitTasksRequest.tasks (field 1) holding a SubmitTaskRequest with a bad task_type.
        let m = refused::<proto::SubmitTasksRequest>(&[0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe]);
        assert_eq!(m, "invalid SubmitTasksRequest.tasks.task_type: not valid UTF-8");
    }

    #[test]
    fn other_malformed_bytes_say_what_is_wrong_without_internals() {
        // A length running past the end of the message.
        let m = refused::<proto::SubmitTaskRequest>(&[0x0a, 0x10, b'a']);
        assert!(m.starts_with("invalid SubmitTaskRequest.task_type: "), "{m}");
        assert!(!m.contains("Protobuf"), "{m}");
        // A truncated varint key.
        let m = refused::<proto::SubmitTaskRequest>(&[0xff]);
        assert_eq!(m, "malformed SubmitTaskRequest: invalid varint");
        assert_eq!(reason("something else entirely"), "not a valid protobuf encoding");
    }
}
