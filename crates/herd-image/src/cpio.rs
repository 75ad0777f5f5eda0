//! The `newc` cpio format, the one format the Linux kernel unpacks as an initramfs.
//! Written here (a writer and a reader of ~100 lines each) rather than shelling out to
//! `cpio`, so that image builds need no host tool beyond apt and give byte-for-byte
//! reproducible archives (fixed inode numbers, mtime 0, root ownership), and so the
//! container driver can unpack the same archive as a root filesystem.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, S_IFDIR | 0o755, 2, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (mode & 0o7777), 1, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        if ino != 0 {
            self.next_ino += 1;
        }
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.write_padded(header.as_bytes(), &[name.as_bytes(), &[0]])?;
        self.write_padded(data, &[])?;
        Ok(())
    }

    /// Writes `first` and `rest` back to back, then pads to a multiple of 4 bytes.
    fn write_padded(&mut self, first: &[u8], rest: &[&[u8]]) -> io::Result<()> {
        self.out.write_all(first)?;
        self.written += first.len() as u64;
        for part in rest {
            self.out.write_all(part)?;
            self.written += part.len() as u64;
        }
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 4][..pad])?;
        self.written += pad as u64;
        Ok(())
    }
}

/// One entry of a `newc` archive, borrowing its name and data from the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub mode: u32,
    pub data: &'a [u8],
}

impl Entry<'_> {
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & 0o170000 == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & 0o170000 == S_IFLNK
    }
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// Why an archive cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpioError {
    #[error("cpio archive cut short at byte {0}")]
    Truncated(usize),
    #[error("not a newc cpio entry at byte {0}")]
    BadMagic(usize),
    #[error("bad header field at byte {0}")]
    BadField(usize),
    #[error("entry name at byte {0} is not UTF-8 or not a relative path inside the archive")]
    BadName(usize),
}

const HEADER_LEN: usize = 110;

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Every entry of a `newc` archive up to its trailer. Names are checked to stay inside
/// the archive (no absolute paths, no `..`), so unpacking one cannot write elsewhere.
pub fn read(archive: &[u8]) -> Result<Vec<Entry<'_>>, CpioError> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    loop {
        let header = archive
            .get(at..at + HEADER_LEN)
            .ok_or(CpioError::Truncated(at))?;
        if &header[..6] != b"070701" {
            return Err(CpioError::BadMagic(at));
        }
        let field = |i: usize| {
            let raw = &header[6 + i * 8..6 + (i + 1) * 8];
            std::str::from_utf8(raw)
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .map(|v| v as usize)
                .ok_or(CpioError::BadField(at))
        };
        let mode = field(1)? as u32;
        let size = field(6)?;
        let name_len = field(11)?;
        let name_at = at + HEADER_LEN;
        let raw_name = archive
            .get(name_at..name_at + name_len)
            .ok_or(CpioError::Truncated(name_at))?;
        let name = raw_name
            .strip_suffix(&[0])
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or(CpioError::BadName(name_at))?;
        let data_at = align4(name_at + name_len);
        let data = archive
            .get(data_at..data_at + size)
            .ok_or(CpioError::Truncated(data_at))?;
        if name == "TRAILER!!!" {
            return Ok(entries);
        }
        let inside = !name.is_empty()
            && !name.starts_with('/')
            && name.split('/').all(|part| part != ".." && !part.is_empty());
        if !inside {
            return Err(CpioError::BadName(name_at));
        }
        entries.push(Entry { name, mode, data });
        at = align4(data_at + size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin").expect("dir");
        w.file("/init", 0o755, b"hello").expect("file");
        let out = w.finish().expect("finish");
        assert_eq!(&out[..6], b"070701");
        // Header (110) + "bin\0" (4) = 114, padded to 116.
        assert_eq!(&out[116..122], b"070701");
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn host_cpio_can_list_it() {
        let Ok(status) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        if !status.status.success() {
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin").expect("dir");
        w.file("/bin/x", 0o644, b"abc").expect("file");
        w.symlink("/bin/y", "x").expect("link");
        let out = w.finish().expect("finish");
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&out)
            .expect("write");
        let listing = child.wait_with_output().expect("wait");
        assert_eq!(
            String::from_utf8_lossy(&listing.stdout),
            "bin\nbin/x\nbin/y\n"
        );
    }

    #[test]
    fn what_is_written_reads_back() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin").expect("dir");
        w.file("/init", 0o755, b"hello").expect("file");
        w.symlink("/bin/sh", "busybox").expect("symlink");
        w.char_device("/dev/null", 0o666, 1, 3).expect("dev");
        let out = w.finish().expect("finish");
        let entries = read(&out).expect("read");
        let names: Vec<&str> = entries.iter().map(|e| e.name).collect();
        assert_eq!(names, ["bin", "init", "bin/sh", "dev/null"]);
        assert!(entries[0].is_dir());
        assert!(entries[1].is_file() && entries[1].permissions() == 0o755);
        assert_eq!(entries[1].data, b"hello");
        assert!(entries[2].is_symlink() && entries[2].data == b"busybox");
        assert!(!entries[3].is_file() && !entries[3].is_dir());
    }

    #[test]
    fn names_leaving_the_archive_and_cut_archives_are_refused() {
        for bad in ["../etc/passwd", "a/../../b", "a//b"] {
            let mut w = CpioWriter::new(Vec::new());
            w.file(bad, 0o644, b"x").expect("file");
            let out = w.finish().expect("finish");
            assert!(read(&out).is_err(), "{bad}");
        }
        // The writer strips a leading slash; an archive from elsewhere may not.
        let mut w = CpioWriter::new(Vec::new());
        w.file("xabs", 0o644, b"x").expect("file");
        let mut out = w.finish().expect("finish");
        let at = out.windows(5).position(|w| w == b"xabs\0").expect("name");
        out[at] = b'/';
        assert!(matches!(read(&out), Err(CpioError::BadName(_))));
        let mut w = CpioWriter::new(Vec::new());
        w.file("f", 0o644, b"data").expect("file");
        let out = w.finish().expect("finish");
        assert!(matches!(
            read(&out[..out.len() - 20]),
            Err(CpioError::Truncated(_))
        ));
        assert!(matches!(read(b"garbage"), Err(CpioError::Truncated(_))));
    }

    proptest::proptest! {
        #[test]
        fn reading_any_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = read(&bytes);
        }
    }
}
