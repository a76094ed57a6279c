//! The disk spool: a FIFO of checksummed batch records in append-only segment files.
//!
//! Layout of the spool directory:
//!
//! - `segment-<20-digit id>.log`: records, appended in order; a new segment is started when the
//!   active one would grow past the segment size, and at every start.
//! - `ack`: `<segment id> <offset>\n`, the position of the first record not yet acknowledged,
//!   replaced atomically (write to `ack.tmp`, rename) after each acknowledgement. It is not
//!   fsync'd: losing it only makes records be resent, which the collector deduplicates by id.
//!
//! A record is a 16-byte header followed by the payload (NDJSON, one event per line):
//!
//! | bytes | field |
//! |---|---|
//! | 0..3 | magic `C5 43 53`: `0xC5` followed by an ASCII byte never occurs in UTF-8 text |
//! | 3 | format version, 1 |
//! | 4..8 | payload length, u32 little-endian |
//! | 8..12 | number of events in the payload, u32 little-endian |
//! | 12..16 | CRC-32 (IEEE) of bytes 4..12 followed by the payload, u32 little-endian |
//!
//! Each append is written and `fsync`'d before it counts as spooled. On open, every record after
//! the acknowledged position is verified: a record whose checksum fails is skipped and its events
//! counted as dropped (`corrupt`); after damage the reader resynchronises on the next valid record,
//! so one bad record never hides the ones behind it; a torn record at the end of a segment (crash
//! mid-write) is truncated away and counted. Fully written records are never lost.
//!
//! - `lock`: held (an exclusive `flock`) while a spool is open, so that a second process given
//!   the same directory refuses to start instead of interleaving its records with the first's
//!   and deleting what the other has not shipped. The lock goes with the process, even on a
//!   crash.
//!
//! `max_bytes` bounds the disk used by the segment files. Acknowledged records are reclaimed a
//! segment at a time, and all at once when the spool becomes empty.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::metrics::ShipperMetrics;

const MAGIC: [u8; 3] = [0xC5, b'C', b'S'];
const VERSION: u8 = 1;
/// Size of a record header.
pub(crate) const HEADER_LEN: u64 = 16;
const ACK_FILE: &str = "ack";
const ACK_TMP_FILE: &str = "ack.tmp";
const LOCK_FILE: &str = "lock";
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".log";

/// Where a record is and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordRef {
    segment: u64,
    offset: u64,
    len: u32,
    /// Events in the record.
    pub(crate) count: u32,
}

impl RecordRef {
    fn size(&self) -> u64 {
        HEADER_LEN + u64::from(self.len)
    }
}

/// Why an append failed.
#[derive(Debug)]
pub(crate) enum AppendError {
    /// The record does not fit within the spool's byte bound.
    Full,
    /// Writing failed; the spool is unchanged.
    Io(io::Error),
}

/// What open found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Valid records waiting for delivery.
    pub(crate) records: u64,
    /// Events in them.
    pub(crate) events: u64,
    /// Damaged records (or regions) skipped.
    pub(crate) corrupt_records: u64,
    /// Events estimated lost in them.
    pub(crate) corrupt_events: u64,
}

struct Active {
    id: u64,
    file: File,
    len: u64,
}

/// The spool. Not thread-safe by itself; the worker serialises access.
pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    records: VecDeque<RecordRef>,
    /// Segment id → bytes on disk.
    segments: BTreeMap<u64, u64>,
    active: Option<Active>,
    reader: Option<(u64, File)>,
    next_segment: u64,
    pending_events: u64,
    metrics: ShipperMetrics,
    /// The locked `lock` file: held while the spool is open.
    _lock: File,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("records", &self.records.len())
            .field("pending_events", &self.pending_events)
            .field("disk_bytes", &self.disk_bytes())
            .finish()
    }
}

fn segment_name(id: u64) -> String {
    format!("{SEGMENT_PREFIX}{id:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()
}

fn checksum(len: u32, count: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&count.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn encode_header(len: u32, count: u32, crc: u32) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..3].copy_from_slice(&MAGIC);
    header[3] = VERSION;
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..12].copy_from_slice(&count.to_le_bytes());
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    header
}

/// A parsed header (not yet verified against the payload).
#[derive(Clone, Copy)]
struct Header {
    len: u32,
    count: u32,
    crc: u32,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let slice = bytes.get(at..at + 4)?;
    let mut word = [0u8; 4];
    word.copy_from_slice(slice);
    Some(u32::from_le_bytes(word))
}

/// The header at the start of `bytes`, if its magic and version are right.
fn parse_header(bytes: &[u8]) -> Option<Header> {
    if bytes.get(..3)? != MAGIC || *bytes.get(3)? != VERSION {
        return None;
    }
    Some(Header { len: read_u32(bytes, 4)?, count: read_u32(bytes, 8)?, crc: read_u32(bytes, 12)? })
}

/// The record starting at `data[pos..]`, if it is complete and its checksum matches.
fn valid_record_at(data: &[u8], pos: usize) -> Option<Header> {
    let header = parse_header(data.get(pos..)?)?;
    let start = pos + HEADER_LEN as usize;
    let payload = data.get(start..start.checked_add(header.len as usize)?)?;
    (checksum(header.len, header.count, payload) == header.crc).then_some(header)
}

/// Offset of the next valid record after a damaged one at `pos`.
fn resync(data: &[u8], pos: usize) -> Option<usize> {
    let mut from = pos + 1;
    while from + MAGIC.len() <= data.len() {
        let found = data[from..].windows(MAGIC.len()).position(|w| w == MAGIC)?;
        let candidate = from + found;
        if valid_record_at(data, candidate).is_some() {
            return Some(candidate);
        }
        from = candidate + 1;
    }
    None
}

/// Estimated events lost in the damaged region `data[pos..end]`: the header's count when the
/// header is intact and consistent with the region (for a whole record, no more than its
/// lines: the damage may be in the count itself), otherwise the number of complete lines.
fn damaged_events(data: &[u8], pos: usize, end: usize) -> u64 {
    let region = &data[pos..end];
    let lines = region.iter().filter(|&&b| b == b'\n').count() as u64;
    if let Some(header) = parse_header(region) {
        let claimed_end = HEADER_LEN as usize + header.len as usize;
        // Consistent: the region is exactly this record, or its torn beginning.
        if claimed_end == region.len() {
            // One event per NDJSON line; one more in case the last has no newline.
            return u64::from(header.count).min(lines + 1);
        }
        if end == data.len() && claimed_end > region.len() {
            return u64::from(header.count);
        }
    }
    lines.max(1)
}

/// Takes the spool directory's lock, or fails when another open spool (in this process or
/// another) holds it. A file system that cannot lock (some network file systems) gets a
/// warning, not a refusal: the lock guards against a misconfiguration, the spool works without.
fn lock(dir: &Path) -> io::Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "another process uses this spool ({} is locked); give each sidecar a --spool-dir of its own",
                path.display()
            ),
        )),
        Err(fs::TryLockError::Error(error)) => {
            tracing::warn!(
                file = %path.display(), error = %error,
                "audit spool: cannot lock the spool directory; make sure no other sidecar uses it"
            );
            Ok(file)
        }
    }
}

impl Spool {
    /// Opens (creating it if needed) and recovers the spool in `dir`. Fails when another open
    /// spool holds the directory's lock.
    pub(crate) fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
        metrics: ShipperMetrics,
    ) -> io::Result<(Spool, Recovery)> {
        fs::create_dir_all(dir)?;
        let lock = lock(dir)?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = parse_segment_name(name) {
                ids.push(id);
            } else if name == ACK_TMP_FILE {
                let _ = fs::remove_file(entry.path());
            }
        }
        ids.sort_unstable();
        let ack = read_ack(dir);
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: segment_bytes.max(1),
            records: VecDeque::new(),
            segments: BTreeMap::new(),
            active: None,
            reader: None,
            next_segment: ids.last().map_or(1, |last| last + 1),
            pending_events: 0,
            metrics,
            _lock: lock,
        };
        let mut recovery = Recovery::default();
        for id in ids {
            let path = dir.join(segment_name(id));
            let start = match ack {
                Some((acked_segment, _)) if id < acked_segment => {
                    // Fully acknowledged; its deletion was interrupted.
                    remove_file_logged(&path);
                    continue;
                }
                Some((acked_segment, offset)) if id == acked_segment => offset,
                _ => 0,
            };
            let size = spool.recover_segment(id, &path, start, &mut recovery)?;
            spool.segments.insert(id, size);
        }
        if spool.records.is_empty() {
            spool.reset();
        }
        recovery.records = spool.records.len() as u64;
        recovery.events = spool.pending_events;
        spool.publish();
        Ok((spool, recovery))
    }

    /// Indexes the valid records of segment `id` from `start`, counting and cutting away damage.
    /// Returns the segment's size on disk afterwards.
    fn recover_segment(
        &mut self,
        id: u64,
        path: &Path,
        start: u64,
        recovery: &mut Recovery,
    ) -> io::Result<u64> {
        let data = fs::read(path)?;
        let mut pos = usize::try_from(start).unwrap_or(usize::MAX).min(data.len());
        while pos < data.len() {
            if let Some(header) = valid_record_at(&data, pos) {
                let record =
                    RecordRef { segment: id, offset: pos as u64, len: header.len, count: header.count };
                self.pending_events += u64::from(header.count);
                self.records.push_back(record);
                pos += record.size() as usize;
                continue;
            }
            let next = resync(&data, pos);
            let end = next.unwrap_or(data.len());
            let events = damaged_events(&data, pos, end);
            recovery.corrupt_records += 1;
            recovery.corrupt_events += events;
            self.metrics.corrupt_record(events);
            match next {
                Some(next) => {
                    tracing::error!(
                        segment = %path.display(),
                        offset = pos,
                        bytes = end - pos,
                        events,
                        "audit spool: damaged record skipped, its events are counted as dropped"
                    );
                    pos = next;
                }
                None => {
                    tracing::warn!(
                        segment = %path.display(),
                        offset = pos,
                        bytes = end - pos,
                        events,
                        "audit spool: torn record at the end of a segment (interrupted write) truncated, \
                         its events are counted as dropped"
                    );
                    let file = OpenOptions::new().write(true).open(path)?;
                    file.set_len(pos as u64)?;
                    file.sync_all()?;
                    return Ok(pos as u64);
                }
            }
        }
        Ok(data.len() as u64)
    }

    /// Whether no record is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records waiting.
    pub(crate) fn pending_records(&self) -> u64 {
        self.records.len() as u64
    }

    /// Events waiting.
    pub(crate) fn pending_events(&self) -> u64 {
        self.pending_events
    }

    /// Bytes used on disk.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.segments.values().sum()
    }

    fn publish(&self) {
        self.metrics.set_spool(self.disk_bytes(), self.pending_records(), self.pending_events);
    }

    /// Appends one record holding `count` events and syncs it to disk.
    #[cfg(test)]
    pub(crate) fn append(&mut self, payload: &[u8], count: u32) -> Result<(), AppendError> {
        self.append_within(payload, count, 0)
    }

    /// [`Self::append`], allowed `replacing` bytes past the size limit: the halves of a spooled
    /// record being split take the room of the record they replace. Its bytes, and those of
    /// the records acknowledged before it in its segment, are given back only with the whole
    /// segment, so those count as free too: while a backlog is split the spool exceeds its
    /// limit by at most one segment and one record.
    pub(crate) fn append_within(
        &mut self,
        payload: &[u8],
        count: u32,
        replacing: u64,
    ) -> Result<(), AppendError> {
        let len = u32::try_from(payload.len()).map_err(|_| AppendError::Full)?;
        let size = HEADER_LEN + u64::from(len);
        let allowance = if replacing == 0 {
            0
        } else {
            // Acknowledged records ahead of the head, in its segment: their bytes are not
            // given back until the segment is.
            replacing.saturating_add(self.records.front().map_or(0, |head| head.offset))
        };
        if self.disk_bytes().saturating_add(size) > self.max_bytes.saturating_add(allowance) {
            return Err(AppendError::Full);
        }
        let roll = match &self.active {
            None => true,
            Some(active) => active.len > 0 && active.len + size > self.segment_bytes,
        };
        if roll {
            self.roll().map_err(AppendError::Io)?;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(AppendError::Io(io::Error::other("no active spool segment")));
        };
        let offset = active.len;
        let header = encode_header(len, count, checksum(len, count, payload));
        let written = active
            .file
            .write_all(&header)
            .and_then(|()| active.file.write_all(payload))
            .and_then(|()| active.file.sync_data());
        if let Err(error) = written {
            // Cut the partial record away so that later appends stay readable; if even that
            // fails, abandon the segment (recovery will find and count the damage).
            let restored = active.file.set_len(offset).and_then(|()| active.file.seek(SeekFrom::End(0)));
            if restored.is_err() {
                let on_disk = active.file.metadata().map_or(offset + size, |m| m.len());
                self.segments.insert(active.id, on_disk);
                self.active = None;
            }
            return Err(AppendError::Io(error));
        }
        active.len += size;
        self.segments.insert(active.id, active.len);
        self.records.push_back(RecordRef { segment: active.id, offset, len, count });
        self.pending_events += u64::from(count);
        self.publish();
        Ok(())
    }

    /// Starts a new active segment.
    fn roll(&mut self) -> io::Result<()> {
        // The id is used up whatever happens next: a failure (out of file descriptors, say)
        // must not leave a file behind that every later roll would collide with.
        let id = self.next_segment;
        self.next_segment += 1;
        let path = self.dir.join(segment_name(id));
        let file = OpenOptions::new().create_new(true).append(true).open(&path)?;
        // Make the new directory entry durable, or a crash could lose a synced record's file.
        if let Err(error) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            let _ = fs::remove_file(&path);
            return Err(error);
        }
        self.segments.insert(id, 0);
        self.active = Some(Active { id, file, len: 0 });
        Ok(())
    }

    /// The oldest record and its payload. Records that are damaged (cut short, gone, or
    /// failing their checksum) are removed and counted as dropped (`corrupt`). Any other
    /// error (out of file descriptors, an I/O error of the volume) may pass: it is returned
    /// and the records stay, to be read again later.
    pub(crate) fn head(&mut self) -> io::Result<Option<(RecordRef, Vec<u8>)>> {
        while let Some(record) = self.records.front().copied() {
            match self.read(record) {
                Ok(payload) => return Ok(Some((record, payload))),
                Err(error) if !is_damage(&error) => {
                    // Reopen the file next time.
                    self.reader = None;
                    return Err(error);
                }
                Err(error) => {
                    tracing::error!(
                        segment = record.segment,
                        offset = record.offset,
                        events = record.count,
                        error = %error,
                        "audit spool: record unreadable, its events are counted as dropped"
                    );
                    self.metrics.corrupt_record(u64::from(record.count));
                    self.ack(record);
                }
            }
        }
        Ok(None)
    }

    fn read(&mut self, record: RecordRef) -> io::Result<Vec<u8>> {
        let reader = match &mut self.reader {
            Some((id, file)) if *id == record.segment => file,
            slot => {
                let file = File::open(self.dir.join(segment_name(record.segment)))?;
                &mut slot.insert((record.segment, file)).1
            }
        };
        reader.seek(SeekFrom::Start(record.offset))?;
        let mut header = [0u8; HEADER_LEN as usize];
        reader.read_exact(&mut header)?;
        let parsed = parse_header(&header).ok_or_else(|| damaged("bad record header"))?;
        if parsed.len != record.len || parsed.count != record.count {
            return Err(damaged("record header changed on disk"));
        }
        let mut payload = vec![0u8; record.len as usize];
        reader.read_exact(&mut payload)?;
        if checksum(parsed.len, parsed.count, &payload) != parsed.crc {
            return Err(damaged("checksum mismatch"));
        }
        Ok(payload)
    }

    /// Removes the oldest record, which must be `record`, after the collector acknowledged it (or
    /// it was dropped), and reclaims the disk it no longer needs.
    pub(crate) fn ack(&mut self, record: RecordRef) {
        if self.records.front() != Some(&record) {
            tracing::error!("audit spool: acknowledgement out of order ignored");
            return;
        }
        self.records.pop_front();
        self.pending_events = self.pending_events.saturating_sub(u64::from(record.count));
        match self.records.front().copied() {
            None => self.reset(),
            Some(head) => {
                let done: Vec<u64> = self.segments.range(..head.segment).map(|(id, _)| *id).collect();
                if let Err(error) = write_ack(&self.dir, head.segment, head.offset) {
                    tracing::warn!(error = %error, "audit spool: cannot record the acknowledged position; \
                         acknowledged batches may be resent after a restart (the collector deduplicates them)");
                }
                for id in done {
                    self.remove_segment(id);
                }
            }
        }
        self.publish();
    }

    fn remove_segment(&mut self, id: u64) {
        if self.reader.as_ref().is_some_and(|(reader, _)| *reader == id) {
            self.reader = None;
        }
        if self.active.as_ref().is_some_and(|active| active.id == id) {
            self.active = None;
        }
        self.segments.remove(&id);
        remove_file_logged(&self.dir.join(segment_name(id)));
    }

    /// Deletes every segment and the ack file: nothing is pending.
    fn reset(&mut self) {
        let ids: Vec<u64> = self.segments.keys().copied().collect();
        for id in ids {
            self.remove_segment(id);
        }
        self.active = None;
        self.reader = None;
        self.pending_events = 0;
        match fs::remove_file(self.dir.join(ACK_FILE)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(error = %error, "audit spool: cannot remove the ack file"),
        }
    }
}

fn remove_file_logged(path: &Path) {
    if let Err(error) = fs::remove_file(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), error = %error, "audit spool: cannot remove a spent segment");
    }
}

fn read_ack(dir: &Path) -> Option<(u64, u64)> {
    let text = match fs::read_to_string(dir.join(ACK_FILE)) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(error = %error, "audit spool: cannot read the ack file; resending from the start");
            return None;
        }
    };
    let parsed = parse_ack(&text);
    if parsed.is_none() {
        tracing::warn!("audit spool: the ack file is malformed; resending from the start");
    }
    parsed
}

fn parse_ack(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace();
    let segment = fields.next()?.parse().ok()?;
    let offset = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some((segment, offset))
}

fn write_ack(dir: &Path, segment: u64, offset: u64) -> io::Result<()> {
    let tmp = dir.join(ACK_TMP_FILE);
    let mut file = File::create(&tmp)?;
    file.write_all(format!("{segment} {offset}\n").as_bytes())?;
    // Synced before the rename: on some filesystems a crash could otherwise leave an empty
    // ack file under the new name, and everything would be resent.
    file.sync_data()?;
    fs::rename(tmp, dir.join(ACK_FILE))
}

/// A record found damaged on disk.
fn damaged(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Whether a read error means the record is damaged for good (cut short, its file gone, or
/// failing its checks), rather than a failure that may pass.
fn is_damage(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::NotFound
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::metrics::DropReason;

    fn open(dir: &Path, max: u64, segment: u64) -> (Spool, Recovery, ShipperMetrics) {
        let metrics = ShipperMetrics::new();
        let (spool, recovery) = Spool::open(dir, max, segment, metrics.clone()).unwrap();
        (spool, recovery, metrics)
    }

    fn payload(i: u32) -> Vec<u8> {
        format!("{{\"id\":\"e{i}a\"}}\n{{\"id\":\"e{i}b\"}}\n").into_bytes()
    }

    fn drain(spool: &mut Spool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((record, bytes)) = spool.head().unwrap() {
            spool.ack(record);
            out.push(bytes);
        }
        out
    }

    /// A spool in `dir` holding three records of two events each (`payload(0..3)`), closed;
    /// returns its one segment file.
    fn three_spooled(dir: &Path) -> PathBuf {
        let (mut spool, _, _) = open(dir, 1 << 20, 1 << 20);
        for i in 0..3 {
            spool.append(&payload(i), 2).unwrap();
        }
        drop(spool);
        segment_files(dir).pop().unwrap()
    }

    /// Changes the byte `at` bytes into the second record of `file` (its header first).
    fn edit_second_record(file: &Path, at: usize, change: impl FnOnce(&mut u8)) {
        let mut bytes = fs::read(file).unwrap();
        change(&mut bytes[HEADER_LEN as usize + payload(0).len() + at]);
        fs::write(file, &bytes).unwrap();
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).and_then(parse_segment_name).is_some())
            .collect();
        files.sort();
        files
    }

    /// A read that fails for a reason that may pass (here: the segment's path is briefly a
    /// directory) keeps every record; a later read delivers them.
    #[test]
    fn a_read_error_that_may_pass_keeps_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let file = three_spooled(dir.path());
        let (mut spool, _, metrics) = open(dir.path(), 1 << 20, 1 << 20);
        let aside = dir.path().join("aside");
        fs::rename(&file, &aside).unwrap();
        fs::create_dir(&file).unwrap();
        assert!(spool.head().is_err());
        assert!(spool.head().is_err(), "tried again, still failing");
        assert_eq!(metrics.spool_records(), 3, "records dropped for an error that may pass");
        assert_eq!(metrics.events_dropped(DropReason::Corrupt), 0);
        fs::remove_dir(&file).unwrap();
        fs::rename(&aside, &file).unwrap();
        assert_eq!(drain(&mut spool), vec![payload(0), payload(1), payload(2)]);
        // A segment that is gone is damage: its records are dropped and counted.
        spool.append(&payload(3), 2).unwrap();
        for f in segment_files(dir.path()) {
            fs::remove_file(f).unwrap();
        }
        assert!(spool.head().unwrap().is_none());
        assert_eq!(metrics.events_dropped(DropReason::Corrupt), 2);
    }

    /// A second spool on the same directory (another sidecar given the same --spool-dir) is
    /// refused while the first is open, and the first's records are untouched; once it is
    /// closed the directory opens again with them.
    #[test]
    fn a_spool_directory_serves_one_spool_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (mut first, _, _) = open(dir.path(), 1 << 20, 1 << 20);
        first.append(&payload(0), 2).unwrap();
        let error = Spool::open(dir.path(), 1 << 20, 1 << 20, ShipperMetrics::new()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        assert!(error.to_string().contains("another process uses this spool"), "{error}");
        assert!(error.to_string().contains("--spool-dir"), "{error}");
        first.append(&payload(1), 2).unwrap();
        drop(first);
        let (mut again, recovery, _) = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!((recovery.records, recovery.corrupt_records), (2, 0));
        assert_eq!(drain(&mut again), vec![payload(0), payload(1)]);
    }

    /// A roll that fails (here: a file already holds the next segment's name) costs that
    /// append only; the next one starts a segment under a new name.
    #[test]
    fn a_failed_roll_does_not_stop_later_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _, _) = open(dir.path(), 1 << 20, 1 << 20);
        fs::write(dir.path().join(segment_name(spool.next_segment)), b"").unwrap();
        assert!(matches!(spool.append(&payload(0), 2), Err(AppendError::Io(_))));
        spool.append(&payload(1), 2).unwrap();
        spool.append(&payload(2), 2).unwrap();
        assert_eq!(drain(&mut spool), vec![payload(1), payload(2)]);
    }

    #[test]
    fn records_survive_reopen_in_order_and_acks_persist() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _, metrics) = open(dir.path(), 1 << 20, 100);
        for i in 0..5 {
            spool.append(&payload(i), 2).unwrap();
        }
        assert_eq!(metrics.spool_records(), 5);
        assert_eq!(metrics.spool_events(), 10);
        assert!(segment_files(dir.path()).len() > 1, "small segments roll");
        let (first, bytes) = spool.head().unwrap().unwrap();
        assert_eq!(bytes, payload(0));
        spool.ack(first);
        let (second, _) = spool.head().unwrap().unwrap();
        spool.ack(second);
        drop(spool);

        let (mut spool, recovery, metrics) = open(dir.path(), 1 << 20, 100);
        assert_eq!(recovery, Recovery { records: 3, events: 6, corrupt_records: 0, corrupt_events: 0 });
        assert_eq!(metrics.spool_records(), 3);
        assert_eq!(drain(&mut spool), vec![payload(2), payload(3), payload(4)]);
        assert_eq!(metrics.spool_bytes(), 0);
        assert!(segment_files(dir.path()).is_empty());
    }

    #[test]
    fn torn_tail_is_truncated_and_counted_earlier_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = three_spooled(dir.path());
        let len = fs::metadata(&file).unwrap().len();
        OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 3).unwrap();

        let (mut spool, recovery, metrics) = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(recovery.records, 2);
        assert_eq!(recovery.corrupt_records, 1);
        assert_eq!(metrics.events_dropped(DropReason::Corrupt), 2);
        // New appends go after the cut and stay readable.
        spool.append(&payload(9), 2).unwrap();
        assert_eq!(drain(&mut spool), vec![payload(0), payload(1), payload(9)]);
    }

    #[test]
    fn torn_header_counts_one_unknown_event() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _, _) = open(dir.path(), 1 << 20, 1 << 20);
        spool.append(&payload(0), 2).unwrap();
        drop(spool);
        let file = segment_files(dir.path()).pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(&MAGIC).unwrap();
        drop(f);
        let (mut spool, recovery, metrics) = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(recovery.records, 1);
        assert_eq!(metrics.events_dropped(DropReason::Corrupt), 1);
        assert_eq!(drain(&mut spool), vec![payload(0)]);
    }

    #[test]
    fn corrupt_middle_record_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let file = three_spooled(dir.path());
        // payload byte of record 2
        edit_second_record(&file, HEADER_LEN as usize + 3, |b| *b ^= 0x55);

        let (mut spool, recovery, metrics) = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(recovery.records, 2);
        assert_eq!(recovery.corrupt_events, 2);
        assert_eq!(metrics.spool_corrupt_records(), 1);
        assert_eq!(drain(&mut spool), vec![payload(0), payload(2)]);
    }

    /// A bit flipped in a record's event count does not count millions of events dropped.
    #[test]
    fn a_damaged_count_is_bounded_by_the_records_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = three_spooled(dir.path());
        // the high byte of record 2's count
        edit_second_record(&file, 11, |b| *b ^= 0x40);

        let (mut spool, recovery, _) = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(recovery.records, 2);
        // Its 2 lines, and one more in case the last had no newline (not 2^30 + 2).
        assert_eq!(recovery.corrupt_events, 3, "{recovery:?}");
        assert_eq!(drain(&mut spool), vec![payload(0), payload(2)]);
    }

    #[test]
    fn damaged_header_resynchronises_on_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let file = three_spooled(dir.path());
        // length of record 2: now points past the end
        edit_second_record(&file, 5, |b| *b = 0xFF);

        let (mut spool, recovery, _) = open(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(recovery.records, 2);
        assert_eq!(recovery.corrupt_records, 1);
        assert_eq!(drain(&mut spool), vec![payload(0), payload(2)]);
    }

    #[test]
    fn corruption_after_open_is_detected_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _, metrics) = open(dir.path(), 1 << 20, 1 << 20);
        for i in 0..2 {
            spool.append(&payload(i), 2).unwrap();
        }
        let file = segment_files(dir.path()).pop().unwrap();
        let mut bytes = fs::read(&file).unwrap();
        bytes[HEADER_LEN as usize + 1] ^= 0x01;
        fs::write(&file, &bytes).unwrap();
        assert_eq!(drain(&mut spool), vec![payload(1)]);
        assert_eq!(metrics.events_dropped(DropReason::Corrupt), 2);
    }

    #[test]
    fn byte_bound_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let size = HEADER_LEN + payload(0).len() as u64;
        let (mut spool, _, metrics) = open(dir.path(), 2 * size + 1, 1 << 20);
        spool.append(&payload(0), 2).unwrap();
        spool.append(&payload(1), 2).unwrap();
        assert!(matches!(spool.append(&payload(2), 2), Err(AppendError::Full)));
        assert_eq!(metrics.spool_bytes(), 2 * size);
        let (record, _) = spool.head().unwrap().unwrap();
        spool.ack(record);
        // The acknowledged record shares its segment with a pending one: not reclaimed yet.
        assert!(matches!(spool.append(&payload(2), 2), Err(AppendError::Full)));
        let (record, _) = spool.head().unwrap().unwrap();
        spool.ack(record);
        spool.append(&payload(2), 2).unwrap();
    }
}
