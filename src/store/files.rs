//! Files that travel with requests: uploads carried into the guest and artifacts collected from
//! it, stored in the database (so an API on any host serves them) in chunks of [`CHUNK`] bytes,
//! so that neither the API nor an agent ever holds a whole file in memory.
//!
//! An upload is *staged* before its request exists (the API reads a multipart body part by
//! part) and *linked* to the request in the transaction that creates it; a submission refused
//! half-way leaves only staged rows, which [`Store::drop_stale_uploads`] removes.

use super::{Store, StoreError};
use crate::model::{Artifact, RequestId, Upload, UploadKind};
use crate::timefmt;
use rusqlite::{params, OptionalExtension};

/// Bytes per stored chunk.
pub const CHUNK: usize = 1024 * 1024;

fn kind_of(s: &str) -> Result<UploadKind, StoreError> {
    match s {
        "file" => Ok(UploadKind::File),
        "tar" => Ok(UploadKind::Tar),
        other => Err(StoreError::Corrupt(format!("upload kind {other:?}"))),
    }
}

impl Store {
    /// Starts staging an upload; its id goes into `NewRequest::uploads`.
    pub async fn stage_upload(
        &self,
        path: String,
        kind: UploadKind,
        mode: Option<u32>,
    ) -> Result<i64, StoreError> {
        on_pg!(self.stage_upload(path, kind, mode));
        self.call_write(move |c| {
            c.execute(
                "INSERT INTO uploads (path, kind, mode, staged_at) VALUES (?1, ?2, ?3, ?4)",
                params![path, kind.as_str(), mode, timefmt::now()],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    /// Appends chunk `seq` (0, 1, …) of a staged upload.
    pub async fn append_upload_chunk(
        &self,
        upload: i64,
        seq: i64,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        on_pg!(self.append_upload_chunk(upload, seq, data));
        self.call_write(move |c| {
            c.execute(
                "INSERT INTO upload_chunks (upload_id, seq, data) VALUES (?1, ?2, ?3)",
                params![upload, seq, data],
            )?;
            Ok(())
        })
        .await
    }

    /// Records a staged upload's total size and digest once all its chunks are in.
    pub async fn finish_upload(
        &self,
        upload: i64,
        size: u64,
        sha256: String,
    ) -> Result<(), StoreError> {
        on_pg!(self.finish_upload(upload, size, sha256));
        self.call_write(move |c| {
            c.execute(
                "UPDATE uploads SET size = ?1, sha256 = ?2 WHERE id = ?3 AND request_uuid IS NULL",
                params![size as i64, sha256, upload],
            )?;
            Ok(())
        })
        .await
    }

    /// Removes staged uploads (a refused submission) with their chunks.
    pub async fn discard_uploads(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        on_pg!(self.discard_uploads(ids));
        if ids.is_empty() {
            return Ok(());
        }
        self.call_write(move |c| {
            let tx = c.transaction()?;
            for id in ids {
                tx.execute(
                    "DELETE FROM uploads WHERE id = ?1 AND request_uuid IS NULL",
                    [id],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Removes uploads staged before `before` (RFC 3339) that no request ever took: what a
    /// crashed or abandoned submission left.
    pub async fn drop_stale_uploads(&self, before: String) -> Result<u64, StoreError> {
        on_pg!(self.drop_stale_uploads(before));
        self.call_write(move |c| {
            let n = c.execute(
                "DELETE FROM uploads WHERE request_uuid IS NULL AND staged_at < ?1",
                [before],
            )?;
            Ok(n as u64)
        })
        .await
    }

    /// A request's uploads, in the order they are placed.
    pub async fn uploads(&self, id: RequestId) -> Result<Vec<Upload>, StoreError> {
        on_pg!(self.uploads(id));
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, path, kind, mode, size, sha256 FROM uploads
                 WHERE request_uuid = ?1 ORDER BY seq",
            )?;
            let rows = stmt
                .query_map([id.to_string()], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<u32>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(id, path, kind, mode, size, sha256)| {
                    Ok(Upload {
                        id,
                        path,
                        kind: kind_of(&kind)?,
                        mode,
                        size: size as u64,
                        sha256,
                    })
                })
                .collect()
        })
        .await
    }

    /// Chunk `seq` of an upload; `None` past its end.
    pub async fn upload_chunk(&self, upload: i64, seq: i64) -> Result<Option<Vec<u8>>, StoreError> {
        on_pg!(self.upload_chunk(upload, seq));
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT data FROM upload_chunks WHERE upload_id = ?1 AND seq = ?2",
                params![upload, seq],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    /// Starts storing an artifact of a request; chunks follow with [`Store::append_artifact_chunk`].
    pub async fn begin_artifact(
        &self,
        id: RequestId,
        path: String,
        mode: Option<u32>,
    ) -> Result<i64, StoreError> {
        on_pg!(self.begin_artifact(id, path, mode));
        self.call_write(move |c| {
            c.execute(
                "INSERT INTO artifacts (request_uuid, path, mode) VALUES (?1, ?2, ?3)
                 ON CONFLICT (request_uuid, path) DO UPDATE SET mode = ?3, size = 0,
                     sha256 = NULL, complete = 0, left_out = NULL",
                params![id.to_string(), path, mode],
            )?;
            let aid: i64 = c.query_row(
                "SELECT id FROM artifacts WHERE request_uuid = ?1 AND path = ?2",
                params![id.to_string(), path],
                |r| r.get(0),
            )?;
            c.execute("DELETE FROM artifact_chunks WHERE artifact_id = ?1", [aid])?;
            Ok(aid)
        })
        .await
    }

    pub async fn append_artifact_chunk(
        &self,
        artifact: i64,
        seq: i64,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        on_pg!(self.append_artifact_chunk(artifact, seq, data));
        self.call_write(move |c| {
            c.execute(
                "INSERT INTO artifact_chunks (artifact_id, seq, data) VALUES (?1, ?2, ?3)",
                params![artifact, seq, data],
            )?;
            Ok(())
        })
        .await
    }

    /// Marks an artifact complete, with its size and digest; or, with `left_out`, keeps what
    /// was stored but says why the rest is missing.
    pub async fn end_artifact(
        &self,
        artifact: i64,
        size: u64,
        sha256: Option<String>,
        left_out: Option<String>,
    ) -> Result<(), StoreError> {
        on_pg!(self.end_artifact(artifact, size, sha256, left_out));
        self.call_write(move |c| {
            c.execute(
                "UPDATE artifacts SET size = ?1, sha256 = ?2, complete = ?3, left_out = ?4
                 WHERE id = ?5",
                params![size as i64, sha256, left_out.is_none(), left_out, artifact],
            )?;
            Ok(())
        })
        .await
    }

    /// Records a guest file that was not collected, and why.
    pub async fn leave_out_artifact(
        &self,
        id: RequestId,
        path: String,
        reason: String,
    ) -> Result<(), StoreError> {
        on_pg!(self.leave_out_artifact(id, path, reason));
        self.call_write(move |c| {
            c.execute(
                "INSERT INTO artifacts (request_uuid, path, left_out) VALUES (?1, ?2, ?3)
                 ON CONFLICT (request_uuid, path) DO UPDATE SET left_out = ?3, complete = 0",
                params![id.to_string(), path, reason],
            )?;
            Ok(())
        })
        .await
    }

    /// A request's artifacts by path, left-out ones included.
    pub async fn artifacts(&self, id: RequestId) -> Result<Vec<Artifact>, StoreError> {
        on_pg!(self.artifacts(id));
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, path, size, sha256, mode, left_out FROM artifacts
                 WHERE request_uuid = ?1 ORDER BY path",
            )?;
            let rows = stmt
                .query_map([id.to_string()], |r| {
                    Ok(Artifact {
                        id: r.get(0)?,
                        path: r.get(1)?,
                        size: r.get::<_, i64>(2)? as u64,
                        sha256: r.get(3)?,
                        mode: r.get(4)?,
                        left_out: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    /// Chunk `seq` of an artifact; `None` past its end.
    pub async fn artifact_chunk(
        &self,
        artifact: i64,
        seq: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        on_pg!(self.artifact_chunk(artifact, seq));
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT data FROM artifact_chunks WHERE artifact_id = ?1 AND seq = ?2",
                params![artifact, seq],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NewRequest;
    use crate::store::test_support::temp_store;

    #[tokio::test]
    async fn staged_uploads_are_linked_in_order_or_dropped() {
        let (s, _d) = temp_store().await;
        let a = s
            .stage_upload("/root/a".into(), UploadKind::File, Some(0o755))
            .await
            .unwrap();
        s.append_upload_chunk(a, 0, b"hello ".to_vec())
            .await
            .unwrap();
        s.append_upload_chunk(a, 1, b"world".to_vec())
            .await
            .unwrap();
        s.finish_upload(a, 11, "x".into()).await.unwrap();
        let b = s
            .stage_upload("/root/src".into(), UploadKind::Tar, None)
            .await
            .unwrap();
        let orphan = s
            .stage_upload("/tmp/o".into(), UploadKind::File, None)
            .await
            .unwrap();
        let r = s
            .create(NewRequest {
                vm_name: "t".into(),
                commands: "x".into(),
                timeout: 5,
                uploads: vec![b, a],
                artifacts: vec!["/root/out/*.xml".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.artifacts, ["/root/out/*.xml"]);
        let ups = s.uploads(r.uuid).await.unwrap();
        assert_eq!(
            ups.iter().map(|u| u.path.as_str()).collect::<Vec<_>>(),
            ["/root/src", "/root/a"],
            "in the submission's order"
        );
        assert_eq!((ups[1].mode, ups[1].size), (Some(0o755), 11));
        assert_eq!(s.upload_chunk(a, 1).await.unwrap().unwrap(), b"world");
        assert!(s.upload_chunk(a, 2).await.unwrap().is_none());
        // A staged upload cannot be linked twice.
        let again = s
            .create(NewRequest {
                vm_name: "t".into(),
                commands: "x".into(),
                timeout: 5,
                uploads: vec![a],
                artifacts: vec![],
                ..Default::default()
            })
            .await;
        assert!(again.is_err(), "{again:?}");
        // Orphans go; linked ones stay.
        let later =
            timefmt::format(time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(1));
        assert_eq!(s.drop_stale_uploads(later).await.unwrap(), 1);
        assert!(s.upload_chunk(orphan, 0).await.unwrap().is_none());
        assert_eq!(s.uploads(r.uuid).await.unwrap().len(), 2);
        // Deleting the request takes its files.
        s.control(r.uuid, crate::model::Status::Cancelled)
            .await
            .unwrap();
        s.delete(r.uuid).await.unwrap();
        assert!(s.upload_chunk(a, 0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn artifacts_stored_in_chunks_and_left_out_ones_listed() {
        let (s, _d) = temp_store().await;
        let r = crate::store::test_support::pending_request(&s).await;
        let a = s
            .begin_artifact(r.uuid, "/root/out/a.xml".into(), Some(0o644))
            .await
            .unwrap();
        s.append_artifact_chunk(a, 0, vec![1; 10]).await.unwrap();
        s.end_artifact(a, 10, Some("d".into()), None).await.unwrap();
        s.leave_out_artifact(r.uuid, "/root/out/huge".into(), "over the limit".into())
            .await
            .unwrap();
        let list = s.artifacts(r.uuid).await.unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].size, list[0].left_out.as_deref()), (10, None));
        assert_eq!(list[1].left_out.as_deref(), Some("over the limit"));
        assert_eq!(s.artifact_chunk(a, 0).await.unwrap().unwrap(), vec![1; 10]);
        // Collected again (a retried collection): replaced, not doubled.
        let b = s
            .begin_artifact(r.uuid, "/root/out/a.xml".into(), None)
            .await
            .unwrap();
        assert_eq!(a, b);
        assert!(s.artifact_chunk(a, 0).await.unwrap().is_none());
    }
}
