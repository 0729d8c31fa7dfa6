//! The wgpu backend (feature `wgpu`): the op vocabulary as WGSL compute
//! shaders (`shaders/*.wgsl`, one file per op family, entry points named as
//! the ops), run through Vulkan, Metal or DX12 — on a GPU, or on a CPU
//! through a software driver such as Mesa's lavapipe (which is how CI runs
//! it). f32 throughout; f16/bf16 checkpoint tensors are converted to f32 on
//! upload.
//!
//! Buffers come from a pool (see [`context`]) and go back to it when
//! dropped. Every op is recorded into a command stream that is submitted
//! only when the host reads something back (`download`, `sum_sq`) or writes
//! host data (`upload*`, `weight`): a training step's only round-trips are
//! the loss (and logits) read-back and the `sum_sq` used for clipping.
//!
//! **What is split.** A buffer binding is limited by the adapter
//! (`max_storage_buffer_binding_size`, raised to the adapter's maximum). A
//! frozen weight larger than that is held as several buffers, split along
//! its first (row) dimension. Such a split weight may be used as
//! - the `b` operand of [`Backend::matmul`] (a linear layer's weight in
//!   either orientation: split rows are output features when `tb`, the
//!   summed dimension when not),
//! - the table of [`Backend::embedding_fwd`],
//! - the source of [`Backend::copy`] and [`Backend::download`].
//!
//! Any other use of a split buffer panics with a message naming the op.
//! Activations, gradients and the slab are never split: one activation
//! larger than the binding limit is a bug report waiting to happen (on
//! lavapipe the limit is 2 GiB; on discrete GPUs usually 2–4 GiB).

pub mod context;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, PoolKind};
use crate::error::Result;
use crate::weights::TensorView;
use context::{Access, Binding, Gpu, Pool, Shader};

pub use context::{adapters, best_index, describe, pick_adapter};

/// One piece of a device buffer: elements `start..start+len` of the tensor.
struct Piece {
    buf: wgpu::Buffer,
    start: usize,
    len: usize,
}

/// A float buffer on the device: one pooled buffer, or (a large frozen
/// weight) several pieces split by rows.
pub struct WgpuBuf {
    pieces: Vec<Piece>,
    len: usize,
    /// The pool whose accounting the buffer belongs to, and whether it goes
    /// back to the pool when dropped (else it is freed). None: not counted.
    pool: Option<(Arc<Mutex<Pool>>, bool)>,
}

impl Drop for WgpuBuf {
    fn drop(&mut self) {
        if let Some((pool, pooled)) = &self.pool {
            let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
            for piece in self.pieces.drain(..) {
                if *pooled {
                    p.give_back(piece.buf);
                } else {
                    p.forget(piece.buf);
                }
            }
        }
    }
}

impl WgpuBuf {
    fn bytes(&self) -> u64 {
        self.len as u64 * 4
    }

    /// The single buffer of an unsplit tensor.
    fn one(&self, op: &str) -> &wgpu::Buffer {
        assert!(
            self.pieces.len() == 1,
            "wgpu backend: {op} got a weight split across {} buffers (larger than one binding); \
             only matmul's b operand, embedding tables, copy and download take split weights",
            self.pieces.len()
        );
        &self.pieces[0].buf
    }

    fn ro<'a>(&'a self, index: u32, op: &str) -> Binding<'a> {
        Binding {
            index,
            access: Access::Read,
            buffer: self.one(op),
            bytes: self.bytes(),
        }
    }

    fn rw<'a>(&'a self, index: u32, op: &str) -> Binding<'a> {
        Binding {
            index,
            access: Access::ReadWrite,
            buffer: self.one(op),
            bytes: self.bytes(),
        }
    }

    /// Number of buffers holding this tensor (1 unless split).
    pub fn pieces(&self) -> usize {
        self.pieces.len()
    }
}

/// An integer buffer on the device (token ids, labels, positions), with the
/// largest value kept on the host (RoPE sizes its cos/sin table by it).
pub struct WgpuIds {
    buf: WgpuBuf,
    max: u32,
}

impl WgpuIds {
    fn ro(&self, index: u32) -> Binding<'_> {
        self.buf.ro(index, "ids")
    }
}

/// The wgpu backend.
pub struct WgpuBackend {
    gpu: Gpu,
    /// RoPE (cos, sin) tables by (theta bits, head_dim): buffer and the
    /// number of positions it covers.
    rope_tables: Mutex<HashMap<(u64, usize), (Arc<WgpuBuf>, usize)>>,
}

const WG: usize = 256;
const MAX_GROUPS: usize = 65535;
/// Rows per chunk of the two-pass bias gradient (`bias_grad_part`); fewer
/// rows take the one-pass shader.
const BIAS_GRAD_ROWS: usize = 256;

/// Workgroups for a grid-stride loop over `n` items with `per` threads per
/// group.
fn stride_groups(n: usize, per: usize) -> (u32, u32, u32) {
    (n.div_ceil(per).clamp(1, MAX_GROUPS) as u32, 1, 1)
}

/// A 2-D grid of `count` workgroups (one per row, query, …), folded so that
/// no dimension exceeds 65535; shaders recover the id with `group_id`.
fn grid(count: usize) -> (u32, u32, u32) {
    if count == 0 {
        return (0, 0, 0);
    }
    let x = count.min(MAX_GROUPS);
    (x as u32, count.div_ceil(x) as u32, 1)
}

fn f(x: f64) -> u32 {
    (x as f32).to_bits()
}

fn u(x: usize) -> u32 {
    u32::try_from(x).expect("wgpu backend: size exceeds 32 bits")
}

fn act_code(a: Act) -> u32 {
    match a {
        Act::Gelu => 0,
        Act::GeluTanh => 1,
        Act::Relu => 2,
        Act::Tanh => 3,
        Act::Silu => 4,
    }
}

impl WgpuBackend {
    /// Open the adapter that `--device wgpu[:N]` names.
    pub fn new(index: Option<usize>) -> Result<Self> {
        Self::with_split(index, None)
    }

    /// Bytes of device buffers beft holds (in use or pooled).
    pub fn live_bytes(&self) -> u64 {
        self.gpu.live_bytes()
    }

    /// Lose the device on purpose, as a driver reset would (device-lost tests).
    #[doc(hidden)]
    pub fn destroy_device(&self) {
        self.gpu.destroy_device()
    }

    /// As [`WgpuBackend::new`], splitting every weight larger than
    /// `split_bytes` (tests use a small value to exercise the split path).
    pub fn with_split(index: Option<usize>, split_bytes: Option<u64>) -> Result<Self> {
        let adapter = pick_adapter(index)?;
        Ok(WgpuBackend {
            gpu: Gpu::open(adapter, split_bytes)?,
            rope_tables: Mutex::new(HashMap::new()),
        })
    }

    /// The adapter's description.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.gpu.info
    }

    fn new_buf(&self, n: usize) -> WgpuBuf {
        WgpuBuf {
            pieces: vec![Piece {
                buf: self.gpu.alloc(n as u64 * 4),
                start: 0,
                len: n,
            }],
            len: n,
            pool: Some((self.gpu.pool.clone(), true)),
        }
    }

    /// Upload `data` as a frozen tensor of `rows` rows, split by rows into
    /// buffers no larger than the binding limit.
    pub fn upload_rows(&self, data: &[f32], rows: usize) -> WgpuBuf {
        let n = data.len();
        let rows = rows.max(1);
        assert!(
            n.is_multiple_of(rows),
            "upload_rows: {n} values are not {rows} rows"
        );
        let row_len = n / rows;
        let max_rows = ((self.gpu.split_bytes / 4) as usize / row_len.max(1)).max(1);
        if n as u64 * 4 <= self.gpu.split_bytes || rows == 1 {
            let b = self.upload(data);
            return b;
        }
        let mut pieces = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let nr = max_rows.min(rows - r0);
            let (start, len) = (r0 * row_len, nr * row_len);
            let buf = self.gpu.create(len as u64 * 4);
            self.gpu
                .write(&buf, 0, bytemuck::cast_slice(&data[start..start + len]));
            pieces.push(Piece { buf, start, len });
            r0 += nr;
        }
        WgpuBuf {
            pieces,
            len: n,
            pool: Some((self.gpu.pool.clone(), false)),
        }
    }

    fn ew(&self, entry: &'static str, params: &[u32], binds: &[Binding], n: usize) {
        self.gpu.dispatch(
            Shader::Elementwise,
            entry,
            params,
            binds,
            stride_groups(n, WG),
        );
    }

    /// The (cos, sin) table for positions `0..=max_pos`, computed in f64.
    fn rope_table(&self, theta: f64, head_dim: usize, max_pos: usize) -> Arc<WgpuBuf> {
        let key = (theta.to_bits(), head_dim);
        let mut tables = self.rope_tables.lock().unwrap();
        if let Some((t, npos)) = tables.get(&key) {
            if *npos > max_pos {
                return t.clone();
            }
        }
        let npos = (max_pos + 1).next_power_of_two().max(64);
        let half = head_dim / 2;
        let mut v = Vec::with_capacity(npos * half * 2);
        for p in 0..npos {
            for i in 0..half {
                let ang = p as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
                v.push(ang.cos() as f32);
                v.push(ang.sin() as f32);
            }
        }
        let t = Arc::new(self.upload(&v));
        tables.insert(key, (t.clone(), npos));
        t
    }

    fn matmul_piece(&self, c: &WgpuBuf, a: &WgpuBuf, b: &wgpu::Buffer, b_bytes: u64, p: [u32; 11]) {
        let (m, n) = (p[0] as usize, p[1] as usize);
        self.gpu.dispatch(
            Shader::Matmul,
            "matmul",
            &p,
            &[
                c.rw(1, "matmul (c)"),
                a.ro(2, "matmul (a)"),
                Binding {
                    index: 3,
                    access: Access::Read,
                    buffer: b,
                    bytes: b_bytes,
                },
            ],
            (n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
        );
    }
}

impl Backend for WgpuBackend {
    type T = f32;
    type Buf = WgpuBuf;
    type Ids = WgpuIds;

    fn name(&self) -> String {
        let i = &self.gpu.info;
        format!("wgpu ({}, {:?}, f32)", i.name, i.backend)
    }

    fn sync(&self) {
        self.gpu.wait_idle();
    }

    fn memory(&self) -> Option<super::MemoryStats> {
        let (live, peak) = self.gpu.memory();
        Some(super::MemoryStats { live, peak })
    }

    fn reset_peak(&self) {
        self.gpu.reset_peak();
    }

    fn release_cached(&self) {
        self.gpu.release_cached();
    }

    fn zeros(&self, n: usize) -> WgpuBuf {
        let b = self.new_buf(n);
        self.gpu.clear(&b.pieces[0].buf, n as u64 * 4);
        b
    }

    /// A pooled buffer as its last user left it: no clearing pass.
    fn output(&self, n: usize) -> WgpuBuf {
        self.new_buf(n)
    }

    fn upload(&self, data: &[f32]) -> WgpuBuf {
        let b = self.new_buf(data.len());
        self.gpu
            .write(&b.pieces[0].buf, 0, bytemuck::cast_slice(data));
        b
    }

    fn download(&self, buf: &WgpuBuf) -> Vec<f32> {
        let mut out = vec![0f32; buf.len];
        for p in &buf.pieces {
            let bytes = self.gpu.read(&p.buf, 0, p.len as u64 * 4);
            out[p.start..p.start + p.len].copy_from_slice(bytemuck::cast_slice(&bytes));
        }
        out
    }

    fn upload_ids(&self, ids: &[u32]) -> WgpuIds {
        let buf = self.new_buf(ids.len());
        self.gpu
            .write(&buf.pieces[0].buf, 0, bytemuck::cast_slice(ids));
        WgpuIds {
            buf,
            max: ids.iter().copied().max().unwrap_or(0),
        }
    }

    fn weight(&self, t: &TensorView) -> Result<WgpuBuf> {
        let data = t.to_f32_vec();
        let rows = t.shape.first().copied().unwrap_or(1);
        Ok(self.upload_rows(&data, rows))
    }

    fn len(&self, buf: &WgpuBuf) -> usize {
        buf.len
    }

    fn copy(&self, dst: &mut WgpuBuf, dst_off: usize, src: &WgpuBuf, src_off: usize, n: usize) {
        assert!(
            dst_off + n <= dst.len && src_off + n <= src.len,
            "copy: range"
        );
        let d = dst.one("copy (destination)");
        for p in &src.pieces {
            let lo = src_off.max(p.start);
            let hi = (src_off + n).min(p.start + p.len);
            if lo < hi {
                self.gpu.copy(
                    &p.buf,
                    (lo - p.start) as u64 * 4,
                    d,
                    (dst_off + lo - src_off) as u64 * 4,
                    (hi - lo) as u64 * 4,
                );
            }
        }
    }

    fn fill(&self, buf: &mut WgpuBuf, value: f64) {
        let n = buf.len;
        if value == 0.0 {
            self.gpu.clear(buf.one("fill"), n as u64 * 4);
        } else {
            self.ew("fill", &[u(n), f(value)], &[buf.rw(1, "fill")], n);
        }
    }

    fn matmul(
        &self,
        c: &mut WgpuBuf,
        a: &WgpuBuf,
        b: &WgpuBuf,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    ) {
        assert!(
            a.len >= m * k && b.len >= k * n && c.len >= m * n,
            "matmul shapes"
        );
        if m == 0 || n == 0 {
            return;
        }
        let a_ld = if ta { m } else { k };
        let (ta, tb_u, acc) = (ta as u32, tb as u32, accumulate as u32);
        if b.pieces.len() == 1 {
            let b_ld = if tb { k } else { n };
            let p = [
                u(m),
                u(n),
                u(k),
                ta,
                tb_u,
                acc,
                0,
                u(a_ld),
                u(b_ld),
                0,
                u(n),
            ];
            return self.matmul_piece(c, a, &b.pieces[0].buf, b.bytes(), p);
        }
        // A weight split by rows: one product per piece.
        let row_len = if tb { k } else { n };
        for (i, piece) in b.pieces.iter().enumerate() {
            assert!(
                piece.start % row_len == 0 && piece.len % row_len == 0,
                "matmul: weight split off its rows"
            );
            let (r0, nr) = (piece.start / row_len, piece.len / row_len);
            let p = if tb {
                // Rows of b are output columns r0..r0+nr of c.
                if r0 >= n {
                    break;
                }
                let nr = nr.min(n - r0);
                [u(m), u(nr), u(k), ta, 1, acc, 0, u(a_ld), u(k), u(r0), u(n)]
            } else {
                // Rows of b are the summed indices r0..r0+nr.
                if r0 >= k {
                    break;
                }
                let nr = nr.min(k - r0);
                let a_off = if ta == 1 { r0 * m } else { r0 };
                [
                    u(m),
                    u(n),
                    u(nr),
                    ta,
                    0,
                    if i == 0 { acc } else { 1 },
                    u(a_off),
                    u(a_ld),
                    u(n),
                    0,
                    u(n),
                ]
            };
            self.matmul_piece(c, a, &piece.buf, piece.len as u64 * 4, p);
        }
    }

    fn bias_add(&self, y: &mut WgpuBuf, bias: &WgpuBuf, bias_off: usize, rows: usize, cols: usize) {
        assert!(
            bias_off + cols <= bias.len && rows * cols <= y.len,
            "bias_add: shapes"
        );
        self.gpu.dispatch(
            Shader::Bias,
            "bias_add",
            &[u(rows), u(cols), u(bias_off)],
            &[y.rw(1, "bias_add"), bias.ro(2, "bias_add")],
            stride_groups(rows * cols, WG),
        );
    }

    fn bias_grad(&self, db: &mut WgpuBuf, db_off: usize, dy: &WgpuBuf, rows: usize, cols: usize) {
        assert!(
            db_off + cols <= db.len && rows * cols <= dy.len,
            "bias_grad: shapes"
        );
        // Up to BIAS_GRAD_ROWS rows: one workgroup per 64 columns. More:
        // chunks of rows in parallel, their sums added in a second pass.
        let ncg = cols.div_ceil(64);
        let chunks = rows.div_ceil(BIAS_GRAD_ROWS);
        if chunks <= 1 || cols == 0 {
            self.gpu.dispatch(
                Shader::Bias,
                "bias_grad",
                &[u(rows), u(cols), u(db_off)],
                &[db.rw(1, "bias_grad"), dy.ro(2, "bias_grad")],
                grid(ncg),
            );
            return;
        }
        let part = self.new_buf(chunks * cols);
        self.gpu.dispatch(
            Shader::Bias,
            "bias_grad_part",
            &[u(rows), u(cols), u(BIAS_GRAD_ROWS), u(ncg)],
            &[part.rw(1, "bias_grad"), dy.ro(2, "bias_grad")],
            grid(chunks * ncg),
        );
        self.gpu.dispatch(
            Shader::Bias,
            "bias_grad_sum",
            &[u(chunks), u(cols), u(db_off)],
            &[db.rw(1, "bias_grad"), part.ro(2, "bias_grad")],
            stride_groups(cols, WG),
        );
    }

    fn add(&self, y: &mut WgpuBuf, x: &WgpuBuf, n: usize) {
        assert!(n <= y.len && n <= x.len, "add: shapes");
        self.ew("add", &[u(n)], &[y.rw(1, "add"), x.ro(2, "add")], n);
    }

    fn scale(&self, y: &mut WgpuBuf, s: f64, n: usize) {
        assert!(n <= y.len, "scale: shapes");
        self.ew("scale", &[u(n), f(s)], &[y.rw(1, "scale")], n);
    }

    fn sum_sq(&self, y: &WgpuBuf, n: usize) -> f64 {
        assert!(n <= y.len, "sum_sq: shapes");
        if n == 0 {
            return 0.0;
        }
        let groups = n.div_ceil(WG).min(256);
        let partial = self.new_buf(groups);
        self.gpu.dispatch(
            Shader::Elementwise,
            "sum_sq",
            &[u(n)],
            &[partial.rw(1, "sum_sq"), y.ro(2, "sum_sq")],
            (groups as u32, 1, 1),
        );
        self.download(&partial)
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>()
    }

    fn act_fwd(&self, act: Act, y: &mut WgpuBuf, x: &WgpuBuf, n: usize) {
        assert!(n <= y.len && n <= x.len, "act_fwd: shapes");
        self.gpu.dispatch(
            Shader::Activation,
            "act_fwd",
            &[u(n), act_code(act)],
            &[y.rw(1, "act_fwd"), x.ro(2, "act_fwd")],
            stride_groups(n, WG),
        );
    }

    fn act_bwd(&self, act: Act, dx: &mut WgpuBuf, x: &WgpuBuf, dy: &WgpuBuf, n: usize) {
        assert!(n <= dx.len && n <= x.len && n <= dy.len, "act_bwd: shapes");
        self.gpu.dispatch(
            Shader::Activation,
            "act_bwd",
            &[u(n), act_code(act)],
            &[dx.rw(1, "act_bwd"), x.ro(2, "act_bwd"), dy.ro(3, "act_bwd")],
            stride_groups(n, WG),
        );
    }

    fn dropout(&self, y: &mut WgpuBuf, n: usize, p: f32, seed: u64) {
        assert!(n <= y.len, "dropout: shapes");
        if p <= 0.0 {
            return;
        }
        let s = (1.0 / (1.0 - p as f64)) as f32;
        self.gpu.dispatch(
            Shader::Activation,
            "dropout",
            &[
                u(n),
                p.to_bits(),
                seed as u32,
                (seed >> 32) as u32,
                s.to_bits(),
            ],
            &[y.rw(1, "dropout")],
            stride_groups(n, WG),
        );
    }

    fn layernorm_fwd(
        &self,
        y: &mut WgpuBuf,
        xhat: &mut WgpuBuf,
        rstd: &mut WgpuBuf,
        x: &WgpuBuf,
        gamma: &WgpuBuf,
        beta: &WgpuBuf,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        assert!(
            rows * cols <= x.len && beta_off + cols <= beta.len,
            "layernorm_fwd: shapes"
        );
        let op = "layernorm_fwd";
        self.gpu.dispatch(
            Shader::Norm,
            op,
            &[u(rows), u(cols), f(eps), u(beta_off)],
            &[
                y.rw(1, op),
                xhat.rw(2, op),
                rstd.rw(3, op),
                x.ro(4, op),
                gamma.ro(5, op),
                beta.ro(6, op),
            ],
            grid(rows),
        );
    }

    fn layernorm_bwd(
        &self,
        dx: &mut WgpuBuf,
        dy: &WgpuBuf,
        xhat: &WgpuBuf,
        rstd: &WgpuBuf,
        gamma: &WgpuBuf,
        rows: usize,
        cols: usize,
    ) {
        assert!(
            rows * cols <= dy.len && rows <= rstd.len,
            "layernorm_bwd: shapes"
        );
        let op = "layernorm_bwd";
        self.gpu.dispatch(
            Shader::Norm,
            op,
            &[u(rows), u(cols)],
            &[
                dx.rw(1, op),
                dy.ro(4, op),
                gamma.ro(5, op),
                xhat.ro(7, op),
                rstd.ro(8, op),
            ],
            grid(rows),
        );
    }

    fn attention_fwd(
        &self,
        out: &mut WgpuBuf,
        lse: &mut WgpuBuf,
        q: &WgpuBuf,
        k: &WgpuBuf,
        v: &WgpuBuf,
        mask: &WgpuBuf,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        let op = "attention_fwd";
        let qn = dims.batch * dims.seq * dims.heads;
        self.gpu.dispatch(
            Shader::Attention,
            op,
            &attn_params(&dims, dropout),
            &[
                out.rw(1, op),
                lse.rw(2, op),
                q.ro(3, op),
                k.ro(4, op),
                v.ro(5, op),
                mask.ro(6, op),
            ],
            grid(qn),
        );
    }

    fn attention_bwd(
        &self,
        dq: &mut WgpuBuf,
        dk: &mut WgpuBuf,
        dv: &mut WgpuBuf,
        dout: &WgpuBuf,
        q: &WgpuBuf,
        k: &WgpuBuf,
        v: &WgpuBuf,
        out: &WgpuBuf,
        lse: &WgpuBuf,
        mask: &WgpuBuf,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        assert!(
            dims.kv_seq == dims.seq && dims.q_start == 0,
            "attention_bwd: training shape only"
        );
        let params = attn_params(&dims, dropout);
        let qn = dims.batch * dims.seq * dims.heads;
        let dsum = self.new_buf(qn);
        let op = "attention_bwd_dq";
        self.gpu.dispatch(
            Shader::Attention,
            op,
            &params,
            &[
                q.ro(3, op),
                k.ro(4, op),
                v.ro(5, op),
                mask.ro(6, op),
                dq.rw(7, op),
                dsum.rw(8, op),
                dout.ro(9, op),
                out.ro(10, op),
                lse.ro(11, op),
            ],
            grid(qn),
        );
        let op = "attention_bwd_dkdv";
        self.gpu.dispatch(
            Shader::Attention,
            op,
            &params,
            &[
                q.ro(3, op),
                k.ro(4, op),
                v.ro(5, op),
                mask.ro(6, op),
                dout.ro(9, op),
                lse.ro(11, op),
                dk.rw(12, op),
                dv.rw(13, op),
                dsum.ro(14, op),
            ],
            grid(dims.batch * dims.seq * dims.kv_heads),
        );
    }

    fn rmsnorm_fwd(
        &self,
        y: &mut WgpuBuf,
        xhat: &mut WgpuBuf,
        rstd: &mut WgpuBuf,
        x: &WgpuBuf,
        gamma: &WgpuBuf,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        assert!(rows * cols <= x.len, "rmsnorm_fwd: shapes");
        let op = "rmsnorm_fwd";
        self.gpu.dispatch(
            Shader::Norm,
            op,
            &[u(rows), u(cols), f(eps)],
            &[
                y.rw(1, op),
                xhat.rw(2, op),
                rstd.rw(3, op),
                x.ro(4, op),
                gamma.ro(5, op),
            ],
            grid(rows),
        );
    }

    fn rmsnorm_bwd(
        &self,
        dx: &mut WgpuBuf,
        dy: &WgpuBuf,
        xhat: &WgpuBuf,
        rstd: &WgpuBuf,
        gamma: &WgpuBuf,
        rows: usize,
        cols: usize,
    ) {
        assert!(rows * cols <= dy.len, "rmsnorm_bwd: shapes");
        let op = "rmsnorm_bwd";
        self.gpu.dispatch(
            Shader::Norm,
            op,
            &[u(rows), u(cols)],
            &[
                dx.rw(1, op),
                dy.ro(4, op),
                gamma.ro(5, op),
                xhat.ro(7, op),
                rstd.ro(8, op),
            ],
            grid(rows),
        );
    }

    fn rope(
        &self,
        x: &mut WgpuBuf,
        positions: &WgpuIds,
        rows: usize,
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) {
        assert!(
            rows * heads * head_dim <= x.len && rows <= positions.buf.len,
            "rope: shapes"
        );
        let table = self.rope_table(theta, head_dim, positions.max as usize);
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        self.gpu.dispatch(
            Shader::Rope,
            "rope",
            &[u(rows), u(heads), u(head_dim), sign.to_bits()],
            &[x.rw(1, "rope"), positions.ro(2), table.ro(3, "rope")],
            stride_groups(rows * heads * (head_dim / 2), WG),
        );
    }

    fn swiglu_fwd(&self, h: &mut WgpuBuf, gate: &WgpuBuf, up: &WgpuBuf, n: usize) {
        let op = "swiglu_fwd";
        self.gpu.dispatch(
            Shader::Activation,
            op,
            &[u(n)],
            &[h.rw(1, op), gate.ro(2, op), up.ro(3, op)],
            stride_groups(n, WG),
        );
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut WgpuBuf,
        dup: &mut WgpuBuf,
        dh: &WgpuBuf,
        gate: &WgpuBuf,
        up: &WgpuBuf,
        n: usize,
    ) {
        let op = "swiglu_bwd";
        self.gpu.dispatch(
            Shader::Activation,
            op,
            &[u(n)],
            &[
                dgate.rw(1, op),
                gate.ro(2, op),
                up.ro(3, op),
                dup.rw(4, op),
                dh.ro(5, op),
            ],
            stride_groups(n, WG),
        );
    }

    fn embedding_fwd(
        &self,
        out: &mut WgpuBuf,
        table: &WgpuBuf,
        ids: &WgpuIds,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        assert!(
            rows * dim <= out.len && rows <= ids.buf.len,
            "embedding_fwd: shapes"
        );
        for piece in &table.pieces {
            assert!(
                piece.start % dim.max(1) == 0,
                "embedding_fwd: table split off its rows"
            );
            self.gpu.dispatch(
                Shader::Embedding,
                "embedding_fwd",
                &[
                    u(rows),
                    u(dim),
                    accumulate as u32,
                    u(piece.start / dim.max(1)),
                    u(piece.len / dim.max(1)),
                ],
                &[
                    out.rw(1, "embedding_fwd"),
                    Binding {
                        index: 2,
                        access: Access::Read,
                        buffer: &piece.buf,
                        bytes: piece.len as u64 * 4,
                    },
                    ids.ro(3),
                ],
                stride_groups(rows * dim, WG),
            );
        }
    }

    fn scatter_add_rows(
        &self,
        dx: &mut WgpuBuf,
        dy: &WgpuBuf,
        idx: &WgpuIds,
        rows: usize,
        cols: usize,
    ) {
        assert!(
            rows * cols <= dy.len && rows <= idx.buf.len,
            "scatter_add_rows: shapes"
        );
        let op = "scatter_add_rows";
        self.gpu.dispatch(
            Shader::Embedding,
            op,
            &[u(rows), u(cols)],
            &[dx.rw(1, op), dy.ro(2, op), idx.ro(3)],
            stride_groups(cols, 64),
        );
    }

    fn scale_rows(&self, y: &mut WgpuBuf, w: &WgpuBuf, rows: usize, cols: usize) {
        assert!(rows * cols <= y.len && rows <= w.len, "scale_rows: shapes");
        self.ew(
            "scale_rows",
            &[u(rows), u(cols)],
            &[y.rw(1, "scale_rows"), w.ro(2, "scale_rows")],
            rows * cols,
        );
    }

    fn pool_fwd(
        &self,
        kind: PoolKind,
        out: &mut WgpuBuf,
        h: &WgpuBuf,
        mask: &WgpuBuf,
        b: usize,
        t: usize,
        d: usize,
    ) {
        let op = "pool_fwd";
        self.gpu.dispatch(
            Shader::Pool,
            op,
            &[u(b), u(t), u(d), (kind == PoolKind::Mean) as u32],
            &[out.rw(1, op), h.ro(2, op), mask.ro(3, op)],
            stride_groups(b * d, 64),
        );
    }

    fn pool_bwd(
        &self,
        kind: PoolKind,
        dh: &mut WgpuBuf,
        dout: &WgpuBuf,
        mask: &WgpuBuf,
        b: usize,
        t: usize,
        d: usize,
    ) {
        let op = "pool_bwd";
        self.gpu.dispatch(
            Shader::Pool,
            op,
            &[u(b), u(t), u(d), (kind == PoolKind::Mean) as u32],
            &[dh.rw(1, op), dout.ro(2, op), mask.ro(3, op)],
            stride_groups(b * d, 64),
        );
    }

    fn cross_entropy(
        &self,
        losses: &mut WgpuBuf,
        dlogits: &mut WgpuBuf,
        logits: &WgpuBuf,
        labels: &WgpuIds,
        rows: usize,
        classes: usize,
        grad_scale: f64,
    ) {
        let op = "cross_entropy";
        self.gpu.dispatch(
            Shader::Loss,
            op,
            &[u(rows), u(classes), f(grad_scale)],
            &[
                losses.rw(1, op),
                dlogits.rw(2, op),
                logits.ro(3, op),
                labels.ro(4),
            ],
            grid(rows),
        );
    }

    fn candidate_loss(
        &self,
        ex_loss: &mut WgpuBuf,
        scores: &mut WgpuBuf,
        row_w: &mut WgpuBuf,
        tok_loss: &WgpuBuf,
        idx: &CandidateIndex<'_, WgpuIds>,
        grad_scale: f64,
    ) {
        let (rows, nc, ne) = (idx.rows, idx.cands, idx.examples);
        let scratch = self.new_buf(nc + 2 * ne);
        let params = [u(rows), u(nc), u(ne), f(grad_scale)];
        let binds = |op: &'static str| {
            vec![
                ex_loss.rw(6, op),
                scores.rw(7, op),
                row_w.rw(8, op),
                tok_loss.ro(9, op),
                idx.tok_cand.ro(10),
                idx.cand_ex.ro(11),
                idx.gold.ro(12),
                scratch.rw(13, op),
            ]
        };
        for (entry, n) in [
            ("candidate_scores", nc),
            ("candidate_examples", ne),
            ("candidate_rows", rows),
        ] {
            self.gpu.dispatch(
                Shader::Loss,
                entry,
                &params,
                &binds(entry),
                stride_groups(n, 64),
            );
        }
    }

    fn mse(
        &self,
        losses: &mut WgpuBuf,
        dx: &mut WgpuBuf,
        x: &WgpuBuf,
        target: &WgpuBuf,
        rows: usize,
        grad_scale: f64,
    ) {
        let op = "mse";
        self.gpu.dispatch(
            Shader::Loss,
            op,
            &[u(rows), f(2.0 * grad_scale)],
            &[
                losses.rw(1, op),
                dx.rw(2, op),
                x.ro(3, op),
                target.ro(5, op),
            ],
            stride_groups(rows, WG),
        );
    }

    fn adamw(
        &self,
        params: &mut WgpuBuf,
        grads: &WgpuBuf,
        m: &mut WgpuBuf,
        v: &mut WgpuBuf,
        n: usize,
        h: AdamW,
    ) {
        assert!(
            n <= params.len && n <= grads.len && n <= m.len && n <= v.len,
            "adamw: shapes"
        );
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2 = 1.0 - h.beta2.powi(h.step as i32);
        let op = "adamw";
        self.gpu.dispatch(
            Shader::Adamw,
            op,
            &[
                u(n),
                f(h.beta1),
                f(1.0 - h.beta1),
                f(h.beta2),
                f(1.0 - h.beta2),
                f(h.lr / bc1),
                f(1.0 / bc2.sqrt()),
                f(h.eps),
                f(1.0 - h.lr * h.weight_decay),
            ],
            &[params.rw(1, op), m.rw(2, op), v.rw(3, op), grads.ro(4, op)],
            stride_groups(n, WG),
        );
    }
}

/// The attention shaders' parameter words (see shaders/attention.wgsl).
fn attn_params(d: &AttnDims, dropout: Option<Dropout>) -> [u32; 13] {
    assert!(
        d.head_dim <= 256,
        "wgpu attention: head_dim {} > 256",
        d.head_dim
    );
    assert!(
        d.kv_heads > 0 && d.heads.is_multiple_of(d.kv_heads),
        "attention: heads must be a multiple of kv_heads"
    );
    let (p, seed) = match dropout {
        Some(dr) if dr.p > 0.0 => (dr.p, dr.seed),
        _ => (0.0, 0),
    };
    let inv_keep = if p > 0.0 {
        1.0f32 / ((1.0 - p as f64) as f32)
    } else {
        1.0
    };
    [
        u(d.batch),
        u(d.seq),
        u(d.kv_seq),
        u(d.q_start),
        u(d.heads),
        u(d.kv_heads),
        u(d.head_dim),
        d.causal as u32,
        f(d.scale),
        p.to_bits(),
        seed as u32,
        (seed >> 32) as u32,
        inv_keep.to_bits(),
    ]
}
