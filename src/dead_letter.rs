//! Dead letters: the reason codes and headers that explain why an event landed on the
//! dead-letter topic. The pipeline writes them, `dlq replay` reads them and the metrics
//! label by the codes, so they live here, apart from all three. (Decoding failures
//! have their own codes: `event::DecodeError::REASONS`.)

/// Dead-letter headers, on top of the original record's own. Every one starts with
/// [`HEADER_PREFIX`], so a replay can strip them.
pub const REASON_HEADER: &str = "x-provisioner-reason";
pub const ERROR_HEADER: &str = "x-provisioner-error";
pub const SOURCE_TOPIC_HEADER: &str = "x-provisioner-source-topic";
pub const SOURCE_PARTITION_HEADER: &str = "x-provisioner-source-partition";
pub const SOURCE_OFFSET_HEADER: &str = "x-provisioner-source-offset";
pub const FAILED_AT_HEADER: &str = "x-provisioner-failed-at";
/// What every header provisioner adds begins with.
pub const HEADER_PREFIX: &str = "x-provisioner-";
/// An event's original position, `<partition>/<offset>` on the input topic where it was
/// first published. Set on every dead letter (kept from the record when it already has
/// one) and carried by `dlq replay`, so a replayed event keeps its version however
/// often it is dead-lettered and replayed again.
pub const ORIGIN_HEADER: &str = "x-provisioner-origin";

/// Set on a dead letter whose value was too large to write whole: the original size in
/// bytes. The value then holds only its first [`TRUNCATED_VALUE_BYTES`].
pub const TRUNCATED_HEADER: &str = "x-provisioner-truncated-from";
/// How much of a too-large value a truncated dead letter keeps.
pub const TRUNCATED_VALUE_BYTES: usize = 64 * 1024;

/// Reads [`ORIGIN_HEADER`]'s value.
pub fn parse_origin(value: &[u8]) -> Option<(i32, i64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (partition, offset) = text.split_once('/')?;
    Some((partition.parse().ok()?, offset.parse().ok()?))
}

/// Writes [`ORIGIN_HEADER`]'s value.
pub fn format_origin(partition: i32, offset: i64) -> String {
    format!("{partition}/{offset}")
}

/// The origin a record carries, else its own position.
pub fn origin_of(headers: &[(String, Vec<u8>)], partition: i32, offset: i64) -> (i32, i64) {
    headers
        .iter()
        .rev()
        .find(|(name, _)| name == ORIGIN_HEADER)
        .and_then(|(_, value)| parse_origin(value))
        .unwrap_or((partition, offset))
}

/// Reason code for events some binding failed on for good.
pub const CONNECTOR_FAILED_REASON: &str = "connector_failed";
/// Reason code for events whose processing panicked.
pub const INTERNAL_ERROR_REASON: &str = "internal_error";
/// Reason code for events whose Kafka key is not their `tenant/user id`.
pub const WRONG_KEY_REASON: &str = "wrong_key";
