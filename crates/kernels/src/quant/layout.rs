//! The tiled layout of block-quantized weights (see the module header of `quant`): GGUF blocks into 8-row
//! tiles and back, per format.

use super::*;

/// `file` (rows of GGUF blocks) in 8-row tiles: per tile row (rows `8g .. 8g + 8`, missing rows zeros)
/// and block, each field of the eight rows in turn (see `fields`): the scales, the mins (Q4_1, Q5_1), the
/// high bits (Q5_0, Q5_1) as a bit plane (bit `i` of byte `4r + e`: bit `4i + e` of row `r`'s high-bit
/// word, so bit `i` of the plane's byte `j` is the high bit of byte `j` of word vector `i`), then the
/// quantized values in 4-byte words: word `w` of the eight rows, then word `w + 1`, ...
pub(super) fn tile(format: QuantFormat, cols: usize, file: &[u8]) -> Vec<u8> {
    match format {
        QuantFormat::Q4_K => return tile_q4k(cols, file),
        QuantFormat::Q6_K => return tile_q6k(cols, file),
        QuantFormat::A4_64 | QuantFormat::A4_128 => return tile_a4(format, cols, file, false),
        _ => {}
    }
    let (rb, bb, nb) = (format.row_bytes(cols), format.block_bytes(), cols / BLOCK);
    let rows = file.len() / rb;
    let tb = format.tile_bytes();
    let mut out = crate::mapped::huge_zeroed::<u8>(rows.div_ceil(TILE_ROWS) * nb * tb);
    // Tile rows in parallel (loading is mostly this copy).
    crate::pool::for_each_chunk_mut(&mut out, nb * tb, |g, tiles| {
        for (lane, r) in (g * TILE_ROWS..rows.min((g + 1) * TILE_ROWS)).enumerate() {
            for (b, t) in tiles.chunks_exact_mut(tb).enumerate() {
                let blk = &file[r * rb + b * bb..r * rb + (b + 1) * bb];
                tile_fields(format, lane, |tile_at, blk_at, len, kind| match kind {
                    Field::Scalar | Field::Words => {
                        t[tile_at..tile_at + len].copy_from_slice(&blk[blk_at..blk_at + len])
                    }
                    Field::HighBits => {
                        let qh = u32::from_le_bytes(blk[blk_at..blk_at + 4].try_into().unwrap());
                        for (i, e) in (0..8).flat_map(|i| (0..4).map(move |e| (i, e))) {
                            t[tile_at + e] |= (((qh >> (4 * i + e)) & 1) as u8) << i;
                        }
                    }
                });
            }
        }
    });
    out
}

/// `tile`'s inverse: the first `rows` rows as GGUF blocks.
pub(super) fn untile(format: QuantFormat, rows: usize, cols: usize, tiles: &[u8]) -> Vec<u8> {
    match format {
        QuantFormat::Q4_K => return untile_q4k(rows, cols, tiles),
        QuantFormat::Q6_K => return untile_q6k(rows, cols, tiles),
        QuantFormat::A4_64 | QuantFormat::A4_128 => return untile_a4(format, rows, cols, tiles),
        _ => {}
    }
    let (rb, bb, nb) = (format.row_bytes(cols), format.block_bytes(), cols / BLOCK);
    let tb = format.tile_bytes();
    let mut out = vec![0u8; rows * rb];
    for r in 0..rows {
        let (g, lane) = (r / TILE_ROWS, r % TILE_ROWS);
        for b in 0..nb {
            let t = &tiles[(g * nb + b) * tb..(g * nb + b + 1) * tb];
            let blk = &mut out[r * rb + b * bb..r * rb + (b + 1) * bb];
            tile_fields(format, lane, |tile_at, blk_at, len, kind| match kind {
                Field::Scalar | Field::Words => blk[blk_at..blk_at + len].copy_from_slice(&t[tile_at..tile_at + len]),
                Field::HighBits => {
                    blk[blk_at..blk_at + 4].copy_from_slice(&plane_word(&t[tile_at..tile_at + 4]).to_le_bytes());
                }
            });
        }
    }
    out
}

/// Byte `32c + e` of a tiled 32-value block's nibbles, for one row: value `4c + e` in the low nibble,
/// `16 + 4c + e` in the high one (c in 0..4, e in 0..4), at `32c + 4·lane + e` in the tile.
pub(super) fn nibble_word_offset(c: usize, lane: usize, e: usize) -> usize {
    32 * c + 4 * lane + e
}

/// Every `(c, e)` of a 32-value block's nibble words (see `nibble_word_offset`).
pub(super) fn nibble_bytes() -> impl Iterator<Item = (usize, usize)> {
    (0..4).flat_map(|c| (0..4).map(move |e| (c, e)))
}

/// Calls `f(lane, at, tile_at)` for every super-block of the first `rows` rows of a K-quant matrix: the row's
/// lane in its tiles, the super-block's offset in the file's rows, and its tile's offset (`tile` bytes per
/// super-block of eight rows).
pub(super) fn for_each_super_block(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    tile: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    let (rb, ns, bb) = (format.row_bytes(cols), cols / format.block_len(), format.block_bytes());
    for r in 0..rows {
        let (g, lane) = (r / TILE_ROWS, r % TILE_ROWS);
        for s in 0..ns {
            f(lane, r * rb + s * bb, (g * ns + s) * tile);
        }
    }
}

/// A K-quant matrix's rows (`file`) as tiles of `tile` bytes per super-block of eight rows: `f(lane, sb, t)`
/// writes row lane `lane`'s super-block `sb` into its tile `t`.
pub(super) fn tile_super_blocks(
    format: QuantFormat,
    cols: usize,
    file: &[u8],
    tile: usize,
    f: impl Fn(usize, &[u8], &mut [u8]) + Sync,
) -> Vec<u8> {
    tile_blocks(format.row_bytes(cols), format.block_bytes(), format.tile_row_bytes(cols), file, tile, f)
}

/// `tile_super_blocks` for rows of `rb` file bytes in blocks of `bb` bytes, each block becoming a tile of
/// `tile` bytes in rows of tiles of `tile_row` bytes.
fn tile_blocks(
    rb: usize,
    bb: usize,
    tile_row: usize,
    file: &[u8],
    tile: usize,
    f: impl Fn(usize, &[u8], &mut [u8]) + Sync,
) -> Vec<u8> {
    let rows = file.len() / rb;
    let mut out = crate::mapped::huge_zeroed::<u8>(rows.div_ceil(TILE_ROWS) * tile_row);
    // Tile rows in parallel, as `tile` does.
    crate::pool::for_each_chunk_mut(&mut out, tile_row, |g, tiles| {
        for (lane, r) in (g * TILE_ROWS..rows.min((g + 1) * TILE_ROWS)).enumerate() {
            for (s, t) in tiles.chunks_exact_mut(tile).enumerate() {
                f(lane, &file[r * rb + s * bb..r * rb + (s + 1) * bb], t);
            }
        }
    });
    out
}

/// Offset of the nibbles in an `A4` tile: after the eight rows' f16 scales and their eight f16 mins.
pub(crate) const A4_QS: usize = 32;

/// `A4` rows as tiles (as many bytes as the file): per block of eight rows, their eight scales, their eight
/// mins, then each 32-value sub-block's nibbles as a Q4_1 tile holds them (`A4_QS + 128·j` on). `from_q4_1`:
/// `file` is Q4_1 blocks instead, whose runs of `format.sub_blocks()` share a scale and min (checked by the
/// caller), the first block's taken.
pub(super) fn tile_a4(format: QuantFormat, cols: usize, file: &[u8], from_q4_1: bool) -> Vec<u8> {
    let (n, tile) = (format.sub_blocks(), format.block_bytes() * TILE_ROWS);
    // Sub-block `j`'s 16 bytes of nibbles start at `4 + stride·j` in a block of the source.
    let (rb, bb, stride) =
        if from_q4_1 { (cols / BLOCK * 20, 20 * n, 20) } else { (format.row_bytes(cols), format.block_bytes(), 16) };
    tile_blocks(rb, bb, format.tile_row_bytes(cols), file, tile, |lane, blk, t| {
        t[2 * lane..2 * lane + 2].copy_from_slice(&blk[0..2]);
        t[16 + 2 * lane..16 + 2 * lane + 2].copy_from_slice(&blk[2..4]);
        for j in 0..n {
            for (c, e) in nibble_bytes() {
                t[A4_QS + 128 * j + nibble_word_offset(c, lane, e)] = blk[4 + stride * j + 4 * c + e];
            }
        }
    })
}

/// `tile_a4`'s inverse (of its `A4` file form): the first `rows` rows as `A4` blocks.
pub(super) fn untile_a4(format: QuantFormat, rows: usize, cols: usize, tiles: &[u8]) -> Vec<u8> {
    let (n, tile) = (format.sub_blocks(), format.block_bytes() * TILE_ROWS);
    untile_super_blocks(format, rows, cols, tiles, tile, |lane, t, blk| {
        blk[0..2].copy_from_slice(&t[2 * lane..2 * lane + 2]);
        blk[2..4].copy_from_slice(&t[16 + 2 * lane..16 + 2 * lane + 2]);
        for j in 0..n {
            for (c, e) in nibble_bytes() {
                blk[4 + 16 * j + 4 * c + e] = t[A4_QS + 128 * j + nibble_word_offset(c, lane, e)];
            }
        }
    })
}

/// `tile_super_blocks`' inverse: `f(lane, t, sb)` reads row lane `lane`'s super-block back from its tile `t`
/// into `sb` (zeroed); the first `rows` rows as GGUF super-blocks.
pub(super) fn untile_super_blocks(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    tiles: &[u8],
    tile: usize,
    mut f: impl FnMut(usize, &[u8], &mut [u8]),
) -> Vec<u8> {
    let mut out = vec![0u8; rows * format.row_bytes(cols)];
    for_each_super_block(format, rows, cols, tile, |lane, at, tile_at| {
        f(lane, &tiles[tile_at..tile_at + tile], &mut out[at..at + format.block_bytes()]);
    });
    out
}

/// Q4_K rows (GGUF super-blocks) as tiles (`K4_TILE`).
pub(super) fn tile_q4k(cols: usize, file: &[u8]) -> Vec<u8> {
    tile_super_blocks(QuantFormat::Q4_K, cols, file, K4_TILE, |lane, sb, t| {
        t[2 * lane..2 * lane + 2].copy_from_slice(&sb[0..2]);
        t[16 + 2 * lane..16 + 2 * lane + 2].copy_from_slice(&sb[2..4]);
        for j in 0..SUPER / BLOCK {
            let (sc, m) = q4k_scale_min(j, &sb[4..16]);
            t[K4_SCALES + 8 * j + lane] = sc;
            t[K4_MINS + 8 * j + lane] = m;
            // Sub-block j's value l: nibble j % 2 of byte 16 + 32·(j / 2) + l.
            let v = |l: usize| (sb[16 + 32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF;
            for (c, e) in nibble_bytes() {
                t[K4_QS + 128 * j + nibble_word_offset(c, lane, e)] = v(4 * c + e) | (v(16 + 4 * c + e) << 4);
            }
        }
    })
}

/// `tile_q4k`'s inverse: the first `rows` rows as GGUF super-blocks.
pub(super) fn untile_q4k(rows: usize, cols: usize, tiles: &[u8]) -> Vec<u8> {
    untile_super_blocks(QuantFormat::Q4_K, rows, cols, tiles, K4_TILE, |lane, t, sb| {
        sb[0..2].copy_from_slice(&t[2 * lane..2 * lane + 2]);
        sb[2..4].copy_from_slice(&t[16 + 2 * lane..16 + 2 * lane + 2]);
        let sc = |j: usize| t[K4_SCALES + 8 * j + lane];
        let m = |j: usize| t[K4_MINS + 8 * j + lane];
        // `q4k_scale_min` read backwards: sub-blocks 0..4 in the low six bits of bytes 0..4 (scales) and
        // 4..8 (mins), whose top two bits carry bits 4..6 of sub-blocks 4..8; their low four bits in
        // bytes 8..12 (scale low, min high).
        for j in 0..4 {
            sb[4 + j] = (sc(j) & 63) | ((sc(j + 4) >> 4) << 6);
            sb[8 + j] = (m(j) & 63) | ((m(j + 4) >> 4) << 6);
            sb[12 + j] = (sc(j + 4) & 0xF) | ((m(j + 4) & 0xF) << 4);
        }
        for j in 0..SUPER / BLOCK {
            for (c, e) in nibble_bytes() {
                let byte = t[K4_QS + 128 * j + nibble_word_offset(c, lane, e)];
                let shift = 4 * (j % 2);
                sb[16 + 32 * (j / 2) + 4 * c + e] |= (byte & 0xF) << shift;
                sb[16 + 32 * (j / 2) + 16 + 4 * c + e] |= (byte >> 4) << shift;
            }
        }
    })
}

/// Where Q6_K value `l` (0..256) of a super-block sits in the file: its low-nibble byte and shift in `ql`,
/// its 2-bit field's byte and shift in `qh` (offsets from the super-block's start). Its scale is byte
/// `192 + l / 16`.
pub(super) fn q6k_place(l: usize) -> (usize, u32, usize, u32) {
    let (h, i, li) = (l / 128, l % 128 / 32, l % 32);
    (64 * h + 32 * (i % 2) + li, 4 * (i / 2) as u32, 128 + 32 * h + li, 2 * i as u32)
}

/// Byte offset, within a Q6_K tile's block, of the top-two-bits field of value `4c + e` (bits 0..2 of the
/// nibble at the returned shift) and of value `16 + 4c + e` (bits 2..4), for one row.
pub(super) fn q6k_high_offset(c: usize, lane: usize, e: usize) -> (usize, u32) {
    (128 + 32 * (c / 2) + 4 * lane + e, 4 * (c % 2) as u32)
}

/// Values `4c + e` and `16 + 4c + e` (six bits, before the offset of 32) of row `lane` of a Q6_K tile's block.
pub(super) fn q6k_tile_values(blk: &[u8], c: usize, lane: usize, e: usize) -> [u8; 2] {
    let byte = blk[nibble_word_offset(c, lane, e)];
    let (o, shift) = q6k_high_offset(c, lane, e);
    let hb = blk[o] >> shift;
    [(byte & 0xF) | ((hb & 3) << 4), (byte >> 4) | (((hb >> 2) & 3) << 4)]
}

/// Q6_K rows (GGUF super-blocks) as tiles (`K6_TILE`): per 32-value block, word vector `c`'s low nibbles
/// are values `4c .. 4c + 4` of the eight rows, its high nibbles values `16 + 4c ..` (as Q4_1's), and the
/// top two bits of both sit in one nibble of the high-bit vector `c / 2` (`q6k_high_offset`).
pub(super) fn tile_q6k(cols: usize, file: &[u8]) -> Vec<u8> {
    tile_super_blocks(QuantFormat::Q6_K, cols, file, K6_TILE, |lane, sb, t| {
        t[2 * lane..2 * lane + 2].copy_from_slice(&sb[208..210]);
        for k in 0..SUPER / 16 {
            t[K6_SCALES + 8 * k + lane] = sb[192 + k];
        }
        let v = |l: usize| {
            let (ql, qs, qh, hs) = q6k_place(l);
            ((sb[ql] >> qs) & 0xF, (sb[qh] >> hs) & 3)
        };
        for j in 0..SUPER / BLOCK {
            let blk = &mut t[K6_BLOCKS + K6_BLOCK * j..K6_BLOCKS + K6_BLOCK * (j + 1)];
            for (c, e) in nibble_bytes() {
                let ((lo0, hi0), (lo1, hi1)) = (v(32 * j + 4 * c + e), v(32 * j + 16 + 4 * c + e));
                blk[nibble_word_offset(c, lane, e)] = lo0 | (lo1 << 4);
                let (o, shift) = q6k_high_offset(c, lane, e);
                blk[o] |= (hi0 | (hi1 << 2)) << shift;
            }
        }
    })
}

/// `tile_q6k`'s inverse: the first `rows` rows as GGUF super-blocks.
pub(super) fn untile_q6k(rows: usize, cols: usize, tiles: &[u8]) -> Vec<u8> {
    untile_super_blocks(QuantFormat::Q6_K, rows, cols, tiles, K6_TILE, |lane, t, sb| {
        sb[208..210].copy_from_slice(&t[2 * lane..2 * lane + 2]);
        for k in 0..SUPER / 16 {
            sb[192 + k] = t[K6_SCALES + 8 * k + lane];
        }
        for j in 0..SUPER / BLOCK {
            let blk = &t[K6_BLOCKS + K6_BLOCK * j..K6_BLOCKS + K6_BLOCK * (j + 1)];
            for (c, e) in nibble_bytes() {
                for (l, v) in [4 * c + e, 16 + 4 * c + e].into_iter().zip(q6k_tile_values(blk, c, lane, e)) {
                    let (ql, qs, qh, hs) = q6k_place(32 * j + l);
                    sb[ql] |= (v & 0xF) << qs;
                    sb[qh] |= (v >> 4) << hs;
                }
            }
        }
    })
}

/// A row's high-bit word from its 4 bytes of a tile's bit plane (bit `4i + e` is bit `i` of byte `e`).
pub(super) fn plane_word(bytes: &[u8]) -> u32 {
    (0..32).fold(0u32, |qh, j| qh | ((((bytes[j % 4] >> (j / 4)) & 1) as u32) << j))
}

/// How a block field sits in a tile.
pub(super) enum Field {
    /// A 2-byte scale or min: at `2·lane` in the field's 16 bytes.
    Scalar,
    /// The high-bit word: the lane's 4 bytes of the 32-byte bit plane (`tile`).
    HighBits,
    /// One 4-byte word of quantized values: at `4·lane` in the word's 32 bytes.
    Words,
}

/// Calls `f(tile_offset, block_offset, len, kind)` for each piece of a block of row `lane` of a tile.
pub(super) fn tile_fields(format: QuantFormat, lane: usize, mut f: impl FnMut(usize, usize, usize, Field)) {
    let fields = format.fields();
    let mut at = 0;
    for (i, &w) in fields.iter().enumerate() {
        let base = format.tile_field(i);
        if i + 1 == fields.len() {
            for word in 0..w / 4 {
                f(base + 4 * (TILE_ROWS * word + lane), at + 4 * word, 4, Field::Words);
            }
        } else if w == 4 {
            f(base + 4 * lane, at, 4, Field::HighBits);
        } else {
            f(base + 2 * lane, at, 2, Field::Scalar);
        }
        at += w;
    }
}
