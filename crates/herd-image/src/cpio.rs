//! A writer for the `newc` cpio format, the one format the Linux kernel unpacks as an
//! initramfs. Written here (60 lines) rather than shelling out to `cpio`, so that image
//! builds need no host tool beyond apt and give byte-for-byte reproducible archives
//! (fixed inode numbers, mtime 0, root ownership).

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
}
