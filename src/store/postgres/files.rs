//! Uploads and artifacts on PostgreSQL, in `bytea` chunks of [`crate::store::CHUNK`] bytes.
//! Chunk writes are upserts keyed by (file, seq), so a retry after a lost COMMIT rewrites the
//! same chunk instead of failing on it.

use super::Pg;
use crate::model::{Artifact, RequestId, Upload, UploadKind};
use crate::store::StoreError;
use crate::timefmt;

fn kind_of(s: &str) -> Result<UploadKind, StoreError> {
    match s {
        "file" => Ok(UploadKind::File),
        "tar" => Ok(UploadKind::Tar),
        other => Err(StoreError::Corrupt(format!("upload kind {other:?}"))),
    }
}

fn mode_of(m: Option<i64>) -> Option<u32> {
    m.and_then(|m| u32::try_from(m).ok())
}

impl Pg {
    /// A lost COMMIT leaves at most an unlinked staged row, which stale-upload cleanup drops.
    pub(crate) async fn stage_upload(
        &self,
        path: String,
        kind: UploadKind,
        mode: Option<u32>,
    ) -> Result<i64, StoreError> {
        let mode = mode.map(i64::from);
        write_tx!(self, "stage_upload", |tx| async {
            Ok(tx
                .query_one(
                    "INSERT INTO uploads (path, kind, mode, staged_at) VALUES ($1, $2, $3, $4)
                     RETURNING id",
                    &[&path, &kind.as_str(), &mode, &timefmt::now()],
                )
                .await?
                .get(0))
        }
        .await)
    }

    pub(crate) async fn append_upload_chunk(
        &self,
        upload: i64,
        seq: i64,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        write_tx!(self, "append_upload_chunk", |tx| async {
            tx.execute(
                "INSERT INTO upload_chunks (upload_id, seq, data) VALUES ($1, $2, $3)
                 ON CONFLICT (upload_id, seq) DO UPDATE SET data = EXCLUDED.data",
                &[&upload, &seq, &data],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    pub(crate) async fn finish_upload(
        &self,
        upload: i64,
        size: u64,
        sha256: String,
    ) -> Result<(), StoreError> {
        write_tx!(self, "finish_upload", |tx| async {
            tx.execute(
                "UPDATE uploads SET size = $1, sha256 = $2 WHERE id = $3 AND request_uuid IS NULL",
                &[&(size as i64), &sha256, &upload],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    pub(crate) async fn discard_uploads(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        write_tx!(self, "discard_uploads", |tx| async {
            tx.execute(
                "DELETE FROM uploads WHERE id = ANY($1) AND request_uuid IS NULL",
                &[&ids],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    pub(crate) async fn drop_stale_uploads(&self, before: String) -> Result<u64, StoreError> {
        write_tx!(
            self,
            "drop_stale_uploads",
            |tx| async {
                Ok(tx
                    .execute(
                        "DELETE FROM uploads WHERE request_uuid IS NULL AND staged_at < $1",
                        &[&before],
                    )
                    .await?)
            }
            .await,
            quiet_if | n | *n == 0
        )
    }

    pub(crate) async fn uploads(&self, id: RequestId) -> Result<Vec<Upload>, StoreError> {
        let uuid = id.to_string();
        retry!(self, "uploads", |c| {
            let rows = c
                .query(
                    "SELECT id, path, kind, mode, size, sha256 FROM uploads
                     WHERE request_uuid = $1 ORDER BY seq",
                    &[&uuid],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(Upload {
                        id: r.try_get(0)?,
                        path: r.try_get(1)?,
                        kind: kind_of(r.try_get(2)?)?,
                        mode: mode_of(r.try_get(3)?),
                        size: r.try_get::<_, i64>(4)? as u64,
                        sha256: r.try_get(5)?,
                    })
                })
                .collect()
        })
    }

    pub(crate) async fn upload_chunk(
        &self,
        upload: i64,
        seq: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        retry!(self, "upload_chunk", |c| {
            Ok(c.query_opt(
                "SELECT data FROM upload_chunks WHERE upload_id = $1 AND seq = $2",
                &[&upload, &seq],
            )
            .await?
            .map(|r| r.get(0)))
        })
    }

    /// An upsert that empties the artifact: running it twice leaves the same.
    pub(crate) async fn begin_artifact(
        &self,
        id: RequestId,
        path: String,
        mode: Option<u32>,
    ) -> Result<i64, StoreError> {
        let (uuid, mode) = (id.to_string(), mode.map(i64::from));
        write_tx!(self, "begin_artifact", |tx| async {
            let aid: i64 = tx
                .query_one(
                    "INSERT INTO artifacts (request_uuid, path, mode) VALUES ($1, $2, $3)
                     ON CONFLICT (request_uuid, path) DO UPDATE SET mode = EXCLUDED.mode,
                         size = 0, sha256 = NULL, complete = FALSE, left_out = NULL
                     RETURNING id",
                    &[&uuid, &path, &mode],
                )
                .await?
                .get(0);
            tx.execute(
                "DELETE FROM artifact_chunks WHERE artifact_id = $1",
                &[&aid],
            )
            .await?;
            Ok(aid)
        }
        .await)
    }

    pub(crate) async fn append_artifact_chunk(
        &self,
        artifact: i64,
        seq: i64,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        write_tx!(self, "append_artifact_chunk", |tx| async {
            tx.execute(
                "INSERT INTO artifact_chunks (artifact_id, seq, data) VALUES ($1, $2, $3)
                 ON CONFLICT (artifact_id, seq) DO UPDATE SET data = EXCLUDED.data",
                &[&artifact, &seq, &data],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    pub(crate) async fn end_artifact(
        &self,
        artifact: i64,
        size: u64,
        sha256: Option<String>,
        left_out: Option<String>,
    ) -> Result<(), StoreError> {
        write_tx!(self, "end_artifact", |tx| async {
            tx.execute(
                "UPDATE artifacts SET size = $1, sha256 = $2, complete = $3, left_out = $4
                 WHERE id = $5",
                &[
                    &(size as i64),
                    &sha256,
                    &left_out.is_none(),
                    &left_out,
                    &artifact,
                ],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    pub(crate) async fn leave_out_artifact(
        &self,
        id: RequestId,
        path: String,
        reason: String,
    ) -> Result<(), StoreError> {
        let uuid = id.to_string();
        write_tx!(self, "leave_out_artifact", |tx| async {
            tx.execute(
                "INSERT INTO artifacts (request_uuid, path, left_out) VALUES ($1, $2, $3)
                 ON CONFLICT (request_uuid, path) DO UPDATE SET left_out = EXCLUDED.left_out,
                     complete = FALSE",
                &[&uuid, &path, &reason],
            )
            .await?;
            Ok(())
        }
        .await)
    }

    pub(crate) async fn artifacts(&self, id: RequestId) -> Result<Vec<Artifact>, StoreError> {
        let uuid = id.to_string();
        retry!(self, "artifacts", |c| {
            let rows = c
                .query(
                    "SELECT id, path, size, sha256, mode, left_out FROM artifacts
                     WHERE request_uuid = $1 ORDER BY path",
                    &[&uuid],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(Artifact {
                        id: r.try_get(0)?,
                        path: r.try_get(1)?,
                        size: r.try_get::<_, i64>(2)? as u64,
                        sha256: r.try_get(3)?,
                        mode: mode_of(r.try_get(4)?),
                        left_out: r.try_get(5)?,
                    })
                })
                .collect()
        })
    }

    pub(crate) async fn artifact_chunk(
        &self,
        artifact: i64,
        seq: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        retry!(self, "artifact_chunk", |c| {
            Ok(c.query_opt(
                "SELECT data FROM artifact_chunks WHERE artifact_id = $1 AND seq = $2",
                &[&artifact, &seq],
            )
            .await?
            .map(|r| r.get(0)))
        })
    }
}
