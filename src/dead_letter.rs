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

/// Reason code for events some binding failed on for good.
pub const CONNECTOR_FAILED_REASON: &str = "connector_failed";
/// Reason code for events whose processing panicked.
pub const INTERNAL_ERROR_REASON: &str = "internal_error";
