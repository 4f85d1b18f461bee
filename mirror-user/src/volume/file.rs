//! [`FileDev`]: one file or block device as a [`BlockDev`], with blocking positioned I/O on
//! tokio's blocking pool.

use std::{path::Path, sync::Arc};

use super::BlockDev;
use crate::storage::store::Store;

/// A single file or block device.
#[derive(Debug, Clone)]
pub struct FileDev {
    store: Arc<Store>,
}

impl FileDev {
    /// Opens `path` (created sparse with `create_size` when missing).
    pub fn open(path: &Path, create_size: Option<u64>) -> std::io::Result<FileDev> {
        Ok(FileDev { store: Arc::new(Store::open(path, create_size)?) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || f(&s)).await.map_err(std::io::Error::other)?
    }
}

impl BlockDev for FileDev {
    fn size(&self) -> u64 {
        self.store.size()
    }

    fn block_size(&self) -> u32 {
        512
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.blocking(move |s| {
            let mut buf = vec![0u8; len as usize];
            s.read_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.blocking(move |s| {
            s.write_at(&data, offset)?;
            if fua {
                s.flush()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.blocking(super::super::storage::store::Store::flush).await
    }

    async fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.blocking(move |s| s.write_zeroes(offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.blocking(move |s| s.write_zeroes(offset, len)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_dev_round_trip() {
        let p = std::env::temp_dir().join(format!("mirror-filedev-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let d = FileDev::open(&p, Some(1 << 20)).unwrap();
        assert_eq!(d.size(), 1 << 20);
        d.write(4096, vec![9; 4096], true).await.unwrap();
        assert_eq!(d.read(4096, 4096).await.unwrap(), vec![9; 4096]);
        d.write_zeroes(4096, 2048).await.unwrap();
        assert_eq!(d.read(4096, 2048).await.unwrap(), vec![0; 2048]);
        d.flush().await.unwrap();
        let _ = std::fs::remove_file(&p);
    }
}
