//! A broadcast's snapshot on this host's disk: its files at their full sizes from the
//! start, each chunk written where it belongs as it arrives, and the manifest beside
//! them. What was received survives a restart of the agent: the chunks that pass their
//! hash, from the first on, are the ones held.

use herd_proto::broadcast::{chunk_bytes_for, Manifest, SnapshotFile};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The manifest's file in a snapshot's directory (not one of the snapshot's files:
/// those are plain names without a dot first).
pub const MANIFEST_FILE: &str = ".manifest";

pub fn hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// One snapshot's files, open for reading and writing chunks.
pub struct Held {
    dir: PathBuf,
    pub manifest: Manifest,
    files: Vec<File>,
}

impl Held {
    /// Opens the snapshot in `dir`, making its files at their sizes where missing, and
    /// keeps the manifest beside them.
    pub fn open(dir: &Path, manifest: &Manifest) -> io::Result<Held> {
        std::fs::create_dir_all(dir)?;
        let mut files = Vec::with_capacity(manifest.files.len());
        for f in &manifest.files {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(&f.name))?;
            if file.metadata()?.len() != f.size {
                file.set_len(f.size)?;
            }
            files.push(file);
        }
        crate::persist::write_atomic(
            &dir.join(MANIFEST_FILE),
            &herd_proto::wire::encode(manifest),
        )?;
        Ok(Held {
            dir: dir.to_owned(),
            manifest: manifest.clone(),
            files,
        })
    }

    /// The manifest kept in `dir`, if one is.
    pub fn manifest_in(dir: &Path) -> Option<Manifest> {
        let bytes = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
        herd_proto::wire::decode(&bytes).ok()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Each file's piece of the span `[start, start + len)`: (file, offset in it,
    /// offset in the span, length).
    fn pieces(&self, start: u64, len: u64) -> Vec<(usize, u64, usize, usize)> {
        let mut out = Vec::new();
        let mut file_start = 0u64;
        let end = start + len;
        for (i, f) in self.manifest.files.iter().enumerate() {
            let file_end = file_start + f.size;
            let lo = start.max(file_start);
            let hi = end.min(file_end);
            if lo < hi {
                out.push((
                    i,
                    lo - file_start,
                    (lo - start) as usize,
                    (hi - lo) as usize,
                ));
            }
            file_start = file_end;
        }
        out
    }

    pub fn read_chunk(&self, i: u32) -> io::Result<Vec<u8>> {
        let (start, len) = self.manifest.chunk_span(i);
        let mut buf = vec![0u8; len as usize];
        for (f, at, from, n) in self.pieces(start, len) {
            self.files[f].read_exact_at(&mut buf[from..from + n], at)?;
        }
        Ok(buf)
    }

    pub fn write_chunk(&self, i: u32, bytes: &[u8]) -> io::Result<()> {
        let (start, len) = self.manifest.chunk_span(i);
        if bytes.len() as u64 != len {
            return Err(io::Error::other(format!(
                "chunk {i} is {} bytes, not {len}",
                bytes.len()
            )));
        }
        for (f, at, from, n) in self.pieces(start, len) {
            self.files[f].write_all_at(&bytes[from..from + n], at)?;
        }
        Ok(())
    }

    /// How many chunks from the first this host holds: each read and checked against
    /// its hash, up to the first that fails.
    pub fn verified_prefix(&self) -> io::Result<u32> {
        for i in 0..self.manifest.chunks() {
            if hash(&self.read_chunk(i)?) != self.manifest.hashes[i as usize] {
                return Ok(i);
            }
        }
        Ok(self.manifest.chunks())
    }

    /// Makes every file hit the disk (once all chunks are in).
    pub fn sync(&self) -> io::Result<()> {
        for f in &self.files {
            f.sync_all()?;
        }
        Ok(())
    }
}

/// The files a driver left in `dir`, cut into chunks and hashed: the manifest's
/// files, chunk size and hashes.
pub fn cut(dir: &Path, names: &[String]) -> io::Result<(Vec<SnapshotFile>, u64, Vec<[u8; 32]>)> {
    let mut files = Vec::with_capacity(names.len());
    let mut total = 0;
    for name in names {
        let size = std::fs::metadata(dir.join(name))?.len();
        total += size;
        files.push(SnapshotFile {
            name: name.clone(),
            size,
        });
    }
    let chunk_bytes = chunk_bytes_for(total);
    let mut manifest = Manifest {
        broadcast: uuid::Uuid::nil(),
        vm: uuid::Uuid::nil(),
        hypervisor: String::new(),
        files: files.clone(),
        chunk_bytes,
        hashes: vec![[0; 32]; total.div_ceil(chunk_bytes) as usize],
        handoff: Vec::new(),
    };
    let opened: Vec<File> = names
        .iter()
        .map(|n| File::open(dir.join(n)))
        .collect::<io::Result<_>>()?;
    let held = Held {
        dir: dir.to_owned(),
        manifest: manifest.clone(),
        files: opened,
    };
    for i in 0..manifest.chunks() {
        manifest.hashes[i as usize] = hash(&held.read_chunk(i)?);
    }
    Ok((files, chunk_bytes, manifest.hashes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chunks_cross_file_boundaries_and_a_copy_verifies_what_it_got() {
        let src = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..700_000u32).map(|i| (i % 13) as u8).collect();
        std::fs::write(src.path().join("a"), &a).unwrap();
        std::fs::write(src.path().join("b"), &b).unwrap();
        let names = vec!["a".to_owned(), "b".to_owned()];
        let (files, chunk_bytes, hashes) = cut(src.path(), &names).unwrap();
        assert_eq!(chunk_bytes, 1 << 20);
        assert_eq!(hashes.len(), 4);
        let manifest = Manifest {
            broadcast: uuid::Uuid::from_u128(1),
            vm: uuid::Uuid::from_u128(2),
            hypervisor: "oci".into(),
            files,
            chunk_bytes,
            hashes,
            handoff: vec![1, 2],
        };
        manifest.check().unwrap();
        let source = Held::open(src.path(), &manifest).unwrap();
        assert_eq!(source.verified_prefix().unwrap(), 4);

        let dst = tempfile::tempdir().unwrap();
        let copy = Held::open(dst.path(), &manifest).unwrap();
        assert_eq!(copy.verified_prefix().unwrap(), 0);
        for i in 0..2 {
            copy.write_chunk(i, &source.read_chunk(i).unwrap()).unwrap();
        }
        assert_eq!(copy.verified_prefix().unwrap(), 2);
        assert!(
            copy.write_chunk(3, &[0; 5]).is_err(),
            "a chunk of the wrong size"
        );
        for i in 2..4 {
            copy.write_chunk(i, &source.read_chunk(i).unwrap()).unwrap();
        }
        // Reopened, as after a restart: everything is held, byte for byte.
        let again = Held::open(dst.path(), &Held::manifest_in(dst.path()).unwrap()).unwrap();
        assert_eq!(again.verified_prefix().unwrap(), 4);
        assert_eq!(std::fs::read(dst.path().join("a")).unwrap(), a);
        assert_eq!(std::fs::read(dst.path().join("b")).unwrap(), b);
    }
}
