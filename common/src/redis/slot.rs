//! Redis Cluster slot arithmetic: which slot a hash tag lands in, and a
//! short tag for every slot (the per-slot data-loss sentinels are named with
//! these, so a user's credit scripts read their slot's sentinel atomically).

use std::sync::OnceLock;

/// Number of Redis Cluster hash slots.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM, the hash Redis Cluster places keys with (table-driven: the
/// slot-tag table below hashes some 170 000 candidates at start-up).
pub fn crc16(bytes: &[u8]) -> u16 {
    const TABLE: [u16; 256] = {
        let mut t = [0u16; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = (i as u16) << 8;
            let mut b = 0;
            while b < 8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
                b += 1;
            }
            t[i] = crc;
            i += 1;
        }
        t
    };
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The cluster slot of a hash tag (e.g. a user id).
pub fn slot_of(tag: &str) -> u16 {
    crc16(tag.as_bytes()) % SLOTS
}

/// The cluster slot of a whole key: its hash tag (the first `{...}` with
/// something inside) when it has one, else the key.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// A short hash tag that lands in `slot`: the slot sentinels are named with
/// these, so a user's scripts can read their slot's sentinel atomically.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; SLOTS as usize];
        let mut missing = SLOTS as usize;
        let mut n: u32 = 0;
        let mut buf = [0u8; 9];
        // About 170 000 tries cover all 16384 slots (coupon collector). The
        // candidate "s" + hex(n) is built in place: no allocation per try.
        while missing > 0 {
            buf[0] = b's';
            let mut len = 1;
            for shift in (0..8).rev() {
                let d = ((n >> (shift * 4)) & 0xf) as u8;
                if d != 0 || len > 1 || shift == 0 {
                    buf[len] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
                    len += 1;
                }
            }
            let slot = &mut tags[usize::from(crc16(&buf[..len]) % SLOTS)];
            if slot.is_none() {
                *slot = Some(String::from_utf8_lossy(&buf[..len]).into_owned());
                missing -= 1;
            }
            n += 1;
        }
        tags.into_iter()
            .map(|t| t.expect("every slot found"))
            .collect()
    });
    &tags[usize::from(slot % SLOTS)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // CRC16/XMODEM check value, and CLUSTER KEYSLOT answers from the Redis docs.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("somekey"), 11058);
        // Hash tags as CLUSTER KEYSLOT reads them.
        assert_eq!(key_slot(b"p:{foo}:credits"), 12182);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"p:{}:foo"), crc16(b"p:{}:foo") % SLOTS);
        assert_eq!(key_slot(b"{foo}{bar}"), 12182);
    }

    #[test]
    fn every_slot_has_a_tag_in_that_slot() {
        for slot in [0, 1, 5000, 12182, SLOTS - 1] {
            assert_eq!(slot_of(slot_tag(slot)), slot);
        }
        assert!((0..SLOTS).all(|s| slot_of(slot_tag(s)) == s));
    }
}
