//! The embedded local store: a cache of the state topic on local disk (redb), so that
//! lookups cost microseconds and memory stays flat however many users there are.
//!
//! The topic is the source of truth; this store is never trusted blindly:
//! - it remembers, per input partition, the state-topic offset up to which it holds every
//!   record (its *checkpoint*), written only when a restore has read the partition to its
//!   end; a restore starts there, or from the beginning when there is none;
//! - a store that cannot be opened (corrupt, or from an incompatible version) is deleted
//!   and rebuilt from the topic; so is one made for another state topic;
//! - writes made while processing are not durable on their own (`Durability::None`): after
//!   a crash redb falls back to its last durable commit, and the next restore reads the
//!   lost writes back from the topic, where they were acknowledged first.
//!
//! Why redb: measured on this machine with 1,000,000 records of this shape, it restored
//! ~1 M records/s at 55 MiB peak RSS (fjall, an LSM: the same speed at 147 MiB after
//! tuning its write buffers), with a lookup plus a write in ~14-18 µs in a transaction of
//! its own and ~5-8 µs batched.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::state::record::StateRecord;

/// (input partition, state key) → the record's JSON, as on the topic.
const RECORDS: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("records");
/// input partition → next state-topic offset to read on restore.
const CHECKPOINTS: TableDefinition<u32, i64> = TableDefinition::new("checkpoints");
/// Pending complete results (`state::pending`), by partition and key, as their JSON.
const PENDING: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("pending");
/// "identity" → which state topic this store caches.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// How many non-durable writes may pile up before one durable commit; redb can reuse
/// freed pages only after a durable commit, so this also bounds the file's growth.
const DURABLE_EVERY: u64 = 5_000;

const FILE_NAME: &str = "state.redb";

/// redb's page cache: lookups of recently active users stay in memory; the rest is one
/// disk read away. Part of the service's memory budget.
const CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the local state store {path} is in use by another process")]
    InUse { path: PathBuf },
    #[error("local state store: {0}")]
    Storage(String),
}

impl StoreError {
    fn storage(error: impl std::fmt::Display) -> StoreError {
        StoreError::Storage(error.to_string())
    }
}

pub struct LocalStore {
    database: Database,
    path: PathBuf,
    writes_since_durable: AtomicU64,
}

impl LocalStore {
    /// Opens (or creates) the store in `directory` for the state topic named by
    /// `identity`. A store that cannot be opened, or that caches another topic, is
    /// deleted and created empty: a restore then rebuilds it from the topic.
    pub fn open(directory: &Path, identity: &str) -> Result<LocalStore, StoreError> {
        std::fs::create_dir_all(directory).map_err(|source| StoreError::Directory {
            path: directory.to_path_buf(),
            source,
        })?;
        let path = directory.join(FILE_NAME);
        let database = match Database::builder().set_cache_size(CACHE_BYTES).create(&path) {
            Ok(database) => database,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse { path }),
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %error, "The local state store cannot be opened; rebuilding it from the state topic.");
                std::fs::remove_file(&path).map_err(|source| StoreError::Directory {
                    path: path.clone(),
                    source,
                })?;
                Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .create(&path)
                    .map_err(StoreError::storage)?
            }
        };
        let store = LocalStore {
            database,
            path,
            writes_since_durable: AtomicU64::new(0),
        };
        if store.identity()?.as_deref() != Some(identity) {
            store.reset(identity)?;
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn identity(&self) -> Result<Option<String>, StoreError> {
        let read = self.database.begin_read().map_err(StoreError::storage)?;
        let table = match read.open_table(META) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(StoreError::storage(error)),
        };
        Ok(table
            .get("identity")
            .map_err(StoreError::storage)?
            .map(|value| value.value().to_string()))
    }

    /// Empties the store and records which topic it now caches.
    fn reset(&self, identity: &str) -> Result<(), StoreError> {
        let mut write = self.database.begin_write().map_err(StoreError::storage)?;
        write
            .set_durability(Durability::Immediate)
            .map_err(StoreError::storage)?;
        write.delete_table(RECORDS).map_err(StoreError::storage)?;
        write.delete_table(CHECKPOINTS).map_err(StoreError::storage)?;
        write.delete_table(PENDING).map_err(StoreError::storage)?;
        {
            write.open_table(RECORDS).map_err(StoreError::storage)?;
            write.open_table(PENDING).map_err(StoreError::storage)?;
            write.open_table(CHECKPOINTS).map_err(StoreError::storage)?;
            let mut meta = write.open_table(META).map_err(StoreError::storage)?;
            meta.insert("identity", identity).map_err(StoreError::storage)?;
        }
        write.commit().map_err(StoreError::storage)
    }

    /// The record for `key` in `partition`. An undecodable one is logged and treated as
    /// absent (the target is then searched), never an error.
    pub fn get(&self, partition: i32, key: &str) -> Result<Option<StateRecord>, StoreError> {
        let read = self.database.begin_read().map_err(StoreError::storage)?;
        let table = read.open_table(RECORDS).map_err(StoreError::storage)?;
        let Some(value) = table.get((partition as u32, key)).map_err(StoreError::storage)? else {
            return Ok(None);
        };
        match StateRecord::decode(value.value()) {
            Ok(record) => Ok(Some(record)),
            Err(error) => {
                tracing::warn!(key, partition, error = %error, "Ignoring an undecodable local state record.");
                Ok(None)
            }
        }
    }

    /// Writes a batch of records the pipeline has written to the state topic, in one
    /// transaction; `durable` also makes everything before it durable (an fsync).
    pub fn put_batch(&self, records: &[(i32, String, StateRecord)], durable: bool) -> Result<(), StoreError> {
        let mut write = self.database.begin_write().map_err(StoreError::storage)?;
        if !durable {
            write.set_durability(Durability::None).map_err(StoreError::storage)?;
        }
        {
            let mut table = write.open_table(RECORDS).map_err(StoreError::storage)?;
            for (partition, key, record) in records {
                table
                    .insert((*partition as u32, key.as_str()), record.encode().as_slice())
                    .map_err(StoreError::storage)?;
            }
        }
        write.commit().map_err(StoreError::storage)?;
        if durable {
            self.writes_since_durable.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether enough non-durable writes have piled up for a durable commit.
    pub fn wants_durable_commit(&self, writes: u64) -> bool {
        self.writes_since_durable.fetch_add(writes, Ordering::Relaxed) + writes >= DURABLE_EVERY
    }

    /// Applies records read from the state topic during a restore: for each key the
    /// record with the highest version wins, whatever order they come in.
    pub fn restore_batch(&self, partition: i32, records: &[(String, StateRecord)]) -> Result<(), StoreError> {
        let mut write = self.database.begin_write().map_err(StoreError::storage)?;
        write.set_durability(Durability::None).map_err(StoreError::storage)?;
        {
            let mut table = write.open_table(RECORDS).map_err(StoreError::storage)?;
            for (key, record) in records {
                let current = table
                    .get((partition as u32, key.as_str()))
                    .map_err(StoreError::storage)?
                    .and_then(|value| StateRecord::decode(value.value()).ok());
                if current.is_none_or(|current| current.is_superseded_by(record)) {
                    table
                        .insert((partition as u32, key.as_str()), record.encode().as_slice())
                        .map_err(StoreError::storage)?;
                }
            }
        }
        write.commit().map_err(StoreError::storage)
    }

    /// A pending result's JSON, if `partition` holds one under `key`.
    pub fn get_pending(&self, partition: i32, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = self.database.begin_read().map_err(StoreError::storage)?;
        let table = match read.open_table(PENDING) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(StoreError::storage(error)),
        };
        let value = table.get((partition as u32, key)).map_err(StoreError::storage)?;
        Ok(value.map(|value| value.value().to_vec()))
    }

    /// Writes (`Some`) or removes (`None`) pending results, in one transaction. Not
    /// made durable here: the state topic has them, and a restore brings them back.
    pub fn put_pending(&self, partition: i32, entries: &[(String, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let mut write = self.database.begin_write().map_err(StoreError::storage)?;
        write.set_durability(Durability::None).map_err(StoreError::storage)?;
        {
            let mut table = write.open_table(PENDING).map_err(StoreError::storage)?;
            for (key, value) in entries {
                match value {
                    Some(value) => {
                        table
                            .insert((partition as u32, key.as_str()), value.as_slice())
                            .map_err(StoreError::storage)?;
                    }
                    None => {
                        table
                            .remove((partition as u32, key.as_str()))
                            .map_err(StoreError::storage)?;
                    }
                }
            }
        }
        write.commit().map_err(StoreError::storage)
    }

    /// The state-topic offset from which `partition`'s restore must read.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<i64>, StoreError> {
        let read = self.database.begin_read().map_err(StoreError::storage)?;
        let table = read.open_table(CHECKPOINTS).map_err(StoreError::storage)?;
        Ok(table
            .get(partition as u32)
            .map_err(StoreError::storage)?
            .map(|value| value.value()))
    }

    /// Records, durably, that the store holds every record of `partition` before
    /// `next_offset` (and so everything before it written earlier without durability).
    pub fn set_checkpoint(&self, partition: i32, next_offset: i64) -> Result<(), StoreError> {
        let mut write = self.database.begin_write().map_err(StoreError::storage)?;
        write
            .set_durability(Durability::Immediate)
            .map_err(StoreError::storage)?;
        {
            let mut table = write.open_table(CHECKPOINTS).map_err(StoreError::storage)?;
            table
                .insert(partition as u32, next_offset)
                .map_err(StoreError::storage)?;
        }
        write.commit().map_err(StoreError::storage)?;
        self.writes_since_durable.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Forgets `partition` (records and checkpoint), before a full restore.
    pub fn clear_partition(&self, partition: i32) -> Result<(), StoreError> {
        let partition = partition as u32;
        let mut write = self.database.begin_write().map_err(StoreError::storage)?;
        write
            .set_durability(Durability::Immediate)
            .map_err(StoreError::storage)?;
        {
            let mut table = write.open_table(RECORDS).map_err(StoreError::storage)?;
            table
                .retain_in((partition, "")..(partition + 1, ""), |_, _| false)
                .map_err(StoreError::storage)?;
            let mut checkpoints = write.open_table(CHECKPOINTS).map_err(StoreError::storage)?;
            checkpoints.remove(partition).map_err(StoreError::storage)?;
            let mut pending = write.open_table(PENDING).map_err(StoreError::storage)?;
            pending
                .retain_in((partition, "")..(partition + 1, ""), |_, _| false)
                .map_err(StoreError::storage)?;
        }
        write.commit().map_err(StoreError::storage)
    }

    /// Records held, all partitions together.
    pub fn len(&self) -> Result<u64, StoreError> {
        let read = self.database.begin_read().map_err(StoreError::storage)?;
        let table = read.open_table(RECORDS).map_err(StoreError::storage)?;
        table.len().map_err(StoreError::storage)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// The store file's size on disk.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path)
            .map(|metadata| metadata.len())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::version::EventVersion;
    use crate::state::record::{AccountState, STATE_SCHEMA_VERSION};

    fn record(offset: i64, account: AccountState) -> StateRecord {
        StateRecord {
            schema: STATE_SCHEMA_VERSION,
            version: EventVersion {
                epoch: 0,
                partition: 0,
                offset,
                sequence: None,
            },
            account,
            remote_id: Some(format!("remote-{offset}")),
            event_id: format!("e{offset}"),
            updated_at: Utc::now(),
            parked_until: None,
            members_emitted: None,
        }
    }

    #[test]
    fn records_are_kept_per_partition_and_survive_a_reopen() {
        let directory = tempfile::tempdir().unwrap();
        {
            let store = LocalStore::open(directory.path(), "state-topic").unwrap();
            store
                .put_batch(
                    &[(0, "directory:acme/u1".into(), record(1, AccountState::Present))],
                    false,
                )
                .unwrap();
            store
                .put_batch(
                    &[(1, "directory:acme/u1".into(), record(2, AccountState::Deleted))],
                    false,
                )
                .unwrap();
            store.set_checkpoint(0, 17).unwrap();
            assert_eq!(store.len().unwrap(), 2);
        }
        let store = LocalStore::open(directory.path(), "state-topic").unwrap();
        assert_eq!(store.get(0, "directory:acme/u1").unwrap().unwrap().version.offset, 1);
        assert_eq!(
            store.get(1, "directory:acme/u1").unwrap().unwrap().account,
            AccountState::Deleted
        );
        assert_eq!(store.checkpoint(0).unwrap(), Some(17));
        assert_eq!(store.checkpoint(1).unwrap(), None);
        store.clear_partition(0).unwrap();
        assert!(store.get(0, "directory:acme/u1").unwrap().is_none());
        assert_eq!(store.checkpoint(0).unwrap(), None);
        assert!(store.get(1, "directory:acme/u1").unwrap().is_some());
    }

    #[test]
    fn a_restore_keeps_the_highest_version_whatever_the_order() {
        let directory = tempfile::tempdir().unwrap();
        let store = LocalStore::open(directory.path(), "state-topic").unwrap();
        let key = "directory:acme/u1".to_string();
        store
            .restore_batch(
                0,
                &[
                    (key.clone(), record(5, AccountState::Present)),
                    (key.clone(), record(9, AccountState::Deleted)),
                    // A late write from an old owner, after the delete.
                    (key.clone(), record(7, AccountState::Present)),
                ],
            )
            .unwrap();
        let kept = store.get(0, &key).unwrap().unwrap();
        assert_eq!((kept.version.offset, kept.account), (9, AccountState::Deleted));
    }

    #[test]
    fn a_corrupt_or_foreign_store_is_rebuilt_empty() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join(FILE_NAME), b"not a redb file at all").unwrap();
        let store = LocalStore::open(directory.path(), "state-topic").unwrap();
        assert!(store.is_empty().unwrap());
        store
            .put_batch(
                &[(0, "directory:acme/u1".into(), record(1, AccountState::Present))],
                false,
            )
            .unwrap();
        store.set_checkpoint(0, 3).unwrap();
        drop(store);
        let other = LocalStore::open(directory.path(), "another-state-topic").unwrap();
        assert!(other.is_empty().unwrap());
        assert_eq!(other.checkpoint(0).unwrap(), None);
    }

    #[test]
    fn an_undecodable_local_record_reads_as_absent() {
        let directory = tempfile::tempdir().unwrap();
        let store = LocalStore::open(directory.path(), "state-topic").unwrap();
        let mut write = store.database.begin_write().unwrap();
        {
            let mut table = write.open_table(RECORDS).unwrap();
            table
                .insert((0u32, "directory:acme/u1"), b"{garbage".as_slice())
                .unwrap();
        }
        write.set_durability(Durability::Immediate).unwrap();
        write.commit().unwrap();
        assert!(store.get(0, "directory:acme/u1").unwrap().is_none());
    }
}
