// The soft rasterizer (../shared/MODEL.md): forward and hand-written backward.
//
// Four kernels, each a 1-D grid of independent work items that own their outputs (no atomics,
// so results are bitwise reproducible on the CPU whatever the thread count):
//   setup     one item per face (b, j): whether the face is skipped, the box of pixels it can
//             touch (its screen bounding box grown by the cut-off distance), and how many
//             tiles (MDR_TILE x MDR_TILE pixels) that box overlaps.
//   bin       one item per face: writes one (tile key, face) pair per overlapped tile into the
//             face's slots of the pair list (slots sized by a prefix sum of setup's counts, so
//             nothing can overflow). The launch code then sorts the pairs by tile, stably, so
//             each tile lists its faces in face order.
//   forward   one item per MDR_LANES adjacent pixels of a tile row: loops over the faces listed
//             for its tile whose box meets those pixels and blends them in; saves three
//             aggregates per pixel for the backward.
//   backward  one item per face (b, j): loops over the pixels of its box, MDR_LANES at a time,
//             recomputes the pairs and accumulates the face's gradients in registers.
// Forward and backward evaluate a (pixel, face) pair with the same function, eval_pair, so
// they agree exactly on which pairs count. Memory is O(pixels + faces + listed pairs).
// MDR_LANES (portability.h) is 1 on the GPU, where every thread takes one pixel, and a SIMD
// vector's width on the CPU, where the lane loops (MDR_SIMD) compile to vector instructions.
//
// Layouts (row-major, contiguous): face_verts (B, F, 3, 3) = screen x, y and view depth z per
// corner; face_attrs (B, F, 3, C); image (B, C + 1, H, pitch); aux (B, 3, H, pitch) =
// (m_i, W_i, T_i); grad_image like image. The pitch is the width rounded up to whole tiles, so a
// lane group never runs off a row; the columns past the width hold pixels outside the image.
// face_boxes (B, F, 4) int = (row0, row1, col0, col1), inclusive, empty when row0 > row1;
// face_tiles (B, F) int = tiles overlapped; bin_starts (B, F) = first slot of each face;
// bin_keys, bin_faces (pairs) = b * tiles + tile (row-major tiles), j; tile_faces (pairs) = the
// faces sorted by tile; tile_ends (B * tiles) = one past each tile's last entry in tile_faces.
// Pixel (r, c) has its center at x = (2c + 1 - W) / H, y = (H - 2r - 1) / H (screen units,
// microdr/conventions.py).

#include "portability.h"

// One argument block for every kernel (fields a kernel does not use are zero). Its layout is
// mirrored by microdr/raster/kernels.py (ARGS_DTYPE): keep the two in the same order.
template <typename T>
struct RasterArgs {
    const T* face_verts;
    const T* face_attrs;
    const T* background;  // (C,)
    int* face_boxes;
    T* face_data;  // (B, F, FACE_RECORD), written by setup for drawn faces
    T* image;
    T* aux;
    const T* grad_image;  // (B, C + 1, H, W)
    T* grad_verts;        // (B, F, 3, 3)
    T* grad_attrs;        // (B, F, 3, C)
    int* face_tiles;
    const long long* bin_starts;
    long long* bin_keys;
    int* bin_faces;
    const int* tile_faces;
    const long long* tile_ends;
    long long n_items;
    int batch, faces, channels, height, width;
    int perspective, cull_backfaces;
    int pitch, tiles_x, tiles_y;  // pitch: row stride of image, aux and grad_image, a multiple of MDR_TILE
    double sigma, gamma, eps, distance_cutoff, near, far;
};

// A face as the pair evaluation needs it, precomputed once by setup (FACE_RECORD values per
// face in face_data) so that the per-pair work has no divisions by per-face quantities.
template <typename T>
struct Face {
    T x[3], y[3], z[3];
    T inv_z[3];
    T area2;        // twice the signed screen area; > 0 for counter-clockwise faces
    T inv_area2;
    T inv_len2[3];  // 1 / |edge k|^2 (0 for a zero-length edge); edge k runs from corner k to k+1
};
#define FACE_RECORD 17

// Tiles are MDR_TILE x MDR_TILE pixels; a tile row holds a whole number of lane groups.
#define MDR_TILE 8
static_assert(MDR_TILE % MDR_LANES == 0, "a tile row must hold whole lane groups");

template <typename T>
MDR_DEVICE Face<T> make_face(const T* __restrict__ corners) {
    Face<T> f;
    for (int k = 0; k < 3; ++k) {
        f.x[k] = corners[3 * k + 0];
        f.y[k] = corners[3 * k + 1];
        f.z[k] = corners[3 * k + 2];
        f.inv_z[k] = T(1) / f.z[k];
    }
    f.area2 = (f.x[1] - f.x[0]) * (f.y[2] - f.y[0]) - (f.y[1] - f.y[0]) * (f.x[2] - f.x[0]);
    f.inv_area2 = T(1) / f.area2;
    for (int k = 0; k < 3; ++k) {
        const int n = k == 2 ? 0 : k + 1;
        const T ex = f.x[n] - f.x[k], ey = f.y[n] - f.y[k];
        const T len2 = ex * ex + ey * ey;
        f.inv_len2[k] = len2 > T(0) ? T(1) / len2 : T(0);
    }
    return f;
}

template <typename T>
MDR_DEVICE void store_face(const Face<T>& f, T* __restrict__ record) {
    for (int k = 0; k < 3; ++k) {
        record[k] = f.x[k], record[3 + k] = f.y[k], record[6 + k] = f.z[k];
        record[9 + k] = f.inv_z[k], record[14 + k] = f.inv_len2[k];
    }
    record[12] = f.area2, record[13] = f.inv_area2;
}

template <typename T>
MDR_DEVICE Face<T> load_face(const T* __restrict__ record) {
    Face<T> f;
    for (int k = 0; k < 3; ++k) {
        f.x[k] = record[k], f.y[k] = record[3 + k], f.z[k] = record[6 + k];
        f.inv_z[k] = record[9 + k], f.inv_len2[k] = record[14 + k];
    }
    f.area2 = record[12], f.inv_area2 = record[13];
    return f;
}

// Faces skipped whole: zero screen area, a corner nearer than `near`, culled back faces.
template <typename T>
MDR_DEVICE bool face_is_drawn(const Face<T>& f, const RasterArgs<T>& a) {
    const T z_min = mdr_min(f.z[0], mdr_min(f.z[1], f.z[2]));
    return f.area2 != T(0) && z_min >= T(a.near) && (!a.cull_backfaces || f.area2 > T(0));
}

// Everything about the (pixel, face) pairs of one face and MDR_LANES adjacent pixels that the
// forward uses and the backward differentiates; lane `lane` at [lane] (a structure of arrays,
// so that loops over the lanes vectorize).
template <typename T>
struct Pairs {
    static constexpr int L = MDR_LANES;
    T b[3][L];          // barycentrics b_k
    T b_clip[3][L];     // clipped barycentrics b~_k
    T clip_sum[L];      // sum_l max(b_l, 0)
    T w_hat[3][L];      // interpolation weights w^_k
    T z_ij[L], zhat[L];  // depth and normalized inverse depth
    T d[L];             // squared distance to the boundary
    T share[3][L];      // the nearest boundary point is sum_k share_k v_k (on one edge: 1 - t and t)
    T rx[L], ry[L];     // p minus the nearest point
    T delta[L];         // delta_ij: +1 inside, -1 outside
    T D[L], one_minus_D[L];  // sigmoid(x) and sigmoid(-x), x = delta d / sigma
};

// Evaluating the pair of pixel center (px, py) and a drawn face into lane `lane` of q takes two
// steps: eval_boundary (where p lies against the face's boundary) and eval_depth (the rest).
// A pair counts if both return true; its values are never used otherwise. Both are branch-free
// (every quantity is computed, then selected), so that a loop over the lanes becomes one SIMD
// instruction stream on the CPU; and `&` and `|` stand for `&&` and `||`, so that every operand
// is evaluated and the compiler has no branch to keep.

// b, delta, d and the nearest point; whether p is inside or within the cut-off distance.
template <typename T>
MDR_DEVICE bool eval_boundary(const Face<T>& f, T px, T py, const RasterArgs<T>& a, Pairs<T>& q, int lane) {
    // b_k: signed area of (p, v_k+1, v_k+2) over the face's.
    T b[3];
    for (int k = 0; k < 3; ++k) {
        const int n = k == 2 ? 0 : k + 1, nn = k == 0 ? 2 : k - 1;
        const T ux = f.x[n] - px, uy = f.y[n] - py;
        const T wx = f.x[nn] - px, wy = f.y[nn] - py;
        b[k] = q.b[k][lane] = (ux * wy - uy * wx) * f.inv_area2;
    }
    const bool inside = (b[0] >= T(0)) & (b[1] >= T(0)) & (b[2] >= T(0));
    q.delta[lane] = inside ? T(1) : T(-1);

    // d: squared distance to the nearest of the three edge segments; edge k runs from v_k to
    // v_k+1, and its nearest point to p is v_k + t (v_k+1 - v_k).
    T d = T(0), rx = T(0), ry = T(0), share[3] = {0, 0, 0};
    for (int k = 0; k < 3; ++k) {
        const int n = k == 2 ? 0 : k + 1;
        const T ex = f.x[n] - f.x[k], ey = f.y[n] - f.y[k];
        const T tx = px - f.x[k], ty = py - f.y[k];
        const T t = mdr_min(mdr_max((tx * ex + ty * ey) * f.inv_len2[k], T(0)), T(1));
        const T rx_k = tx - t * ex, ry_k = ty - t * ey;
        const T d_k = rx_k * rx_k + ry_k * ry_k;
        const bool nearer = k == 0 || d_k < d;
        d = nearer ? d_k : d, rx = nearer ? rx_k : rx, ry = nearer ? ry_k : ry;
        for (int l = 0; l < 3; ++l) share[l] = nearer ? (l == k ? T(1) - t : l == n ? t : T(0)) : share[l];
    }
    q.d[lane] = d, q.rx[lane] = rx, q.ry[lane] = ry;
    for (int k = 0; k < 3; ++k) q.share[k][lane] = share[k];
    return inside | (d <= T(a.distance_cutoff));
}

// The clipped barycentrics, depth, weights and D (after eval_boundary); whether the depth is in
// [near, far] (written so that a NaN depth is not).
template <typename T>
MDR_DEVICE bool eval_depth(const Face<T>& f, const RasterArgs<T>& a, Pairs<T>& q, int lane) {
    T b[3];
    for (int k = 0; k < 3; ++k) b[k] = q.b[k][lane];
    T clip_sum = T(0);
    for (int k = 0; k < 3; ++k) clip_sum += mdr_max(b[k], T(0));
    q.clip_sum[lane] = clip_sum;
    T b_clip[3];
    for (int k = 0; k < 3; ++k) b_clip[k] = q.b_clip[k][lane] = mdr_max(b[k], T(0)) * (T(1) / clip_sum);
    // Perspective: z_ij = 1 / sum_l b~_l / z_l, w^_k = (b~_k / z_k) z_ij; orthographic:
    // z_ij = sum_l b~_l z_l, w^ = b~. Both are computed and one is selected (no branch).
    T inv_z_sum = T(0), z_sum = T(0);
    for (int k = 0; k < 3; ++k) inv_z_sum += b_clip[k] * f.inv_z[k], z_sum += b_clip[k] * f.z[k];
    const bool perspective = a.perspective;
    const T z_ij = q.z_ij[lane] = perspective ? T(1) / inv_z_sum : z_sum;
    for (int k = 0; k < 3; ++k) q.w_hat[k][lane] = perspective ? b_clip[k] * f.inv_z[k] * z_ij : b_clip[k];
    q.zhat[lane] = (T(a.far) - z_ij) * T(1 / (a.far - a.near));

    // D = sigmoid(x) and 1 - D = sigmoid(-x) from one exp of -|x| = -d / sigma, so neither
    // cancels or overflows: with e = exp(-|x|), the larger is 1 / (1 + e) and the smaller e / (1 + e).
    const T e = mdr_exp(-q.d[lane] * T(1 / a.sigma));
    const T larger = T(1) / (T(1) + e);
    const bool inside = q.delta[lane] > T(0);
    q.D[lane] = inside ? larger : e * larger;
    q.one_minus_D[lane] = inside ? e * larger : larger;
    return (z_ij >= T(a.near)) & (z_ij <= T(a.far));
}

template <typename T>
MDR_DEVICE bool eval_pair(const Face<T>& f, T px, T py, const RasterArgs<T>& a, Pairs<T>& q, int lane) {
    return eval_boundary(f, px, py, a, q, lane) & eval_depth(f, a, q, lane);
}

// The lanes' values added up, always in the same order.
template <typename T>
MDR_DEVICE T lane_sum(const T* values) {
    T sum = T(0);
    for (int lane = 0; lane < MDR_LANES; ++lane) sum += values[lane];
    return sum;
}

// Whether any lane's mask (1 or 0, as wide as T so that lane loops can select with it) is set.
template <typename T>
MDR_DEVICE bool any_lane(const T* mask) {
    bool any = false;
    for (int lane = 0; lane < MDR_LANES; ++lane) any |= mask[lane] != T(0);
    return any;
}

template <typename T>
MDR_DEVICE T pixel_x(int col, const RasterArgs<T>& a) { return T(2 * col + 1 - a.width) / T(a.height); }
template <typename T>
MDR_DEVICE T pixel_y(int row, const RasterArgs<T>& a) { return T(a.height - 2 * row - 1) / T(a.height); }

// ---------------------------------------------------------------------------------------------
// setup: one item per face. A pair can count only if the pixel is inside the face or within
// sqrt(distance_cutoff) of it, so the face's box is its screen bounding box grown by that much,
// converted to the pixels whose centers it holds. A thousandth of a pixel of slack keeps
// rounding from ever dropping a pixel; eval_pair decides exactly.
#define BOX_SLACK 1e-3
template <typename T>
__device__ void setup_item(const RasterArgs<T>& a, long long item) {
    int* box = a.face_boxes + 4 * item;
    const Face<T> f = make_face(a.face_verts + 9 * item);
    box[0] = 1, box[1] = 0, box[2] = 1, box[3] = 0;  // empty
    a.face_tiles[item] = 0;
    if (!face_is_drawn(f, a)) return;
    store_face(f, a.face_data + FACE_RECORD * item);
    const T grow = mdr_sqrt(T(a.distance_cutoff));
    const T x0 = mdr_min(f.x[0], mdr_min(f.x[1], f.x[2])) - grow;
    const T x1 = mdr_max(f.x[0], mdr_max(f.x[1], f.x[2])) + grow;
    const T y0 = mdr_min(f.y[0], mdr_min(f.y[1], f.y[2])) - grow;
    const T y1 = mdr_max(f.y[0], mdr_max(f.y[1], f.y[2])) + grow;
    const T h = T(a.height), w = T(a.width), slack = T(BOX_SLACK);
    // Invert x = (2c + 1 - W) / H and y = (H - 2r - 1) / H, clamping in floating point before
    // converting to int (a far-off face must not overflow the conversion).
    const T col0 = mdr_max(mdr_ceil((x0 * h + w - T(1)) / T(2) - slack), T(0));
    const T col1 = mdr_min(mdr_floor((x1 * h + w - T(1)) / T(2) + slack), w - T(1));
    const T row0 = mdr_max(mdr_ceil((h - T(1) - y1 * h) / T(2) - slack), T(0));
    const T row1 = mdr_min(mdr_floor((h - T(1) - y0 * h) / T(2) + slack), h - T(1));
    if (!(col0 <= col1 && row0 <= row1)) return;
    box[0] = (int)row0, box[1] = (int)row1, box[2] = (int)col0, box[3] = (int)col1;
    a.face_tiles[item] = (box[1] / MDR_TILE - box[0] / MDR_TILE + 1) * (box[3] / MDR_TILE - box[2] / MDR_TILE + 1);
}

// ---------------------------------------------------------------------------------------------
// bin: one item per face; its (tile key, face) pairs, tiles in row-major order.
template <typename T>
__device__ void bin_item(const RasterArgs<T>& a, long long item) {
    const int* box = a.face_boxes + 4 * item;
    if (a.face_tiles[item] == 0) return;
    const long long b = item / a.faces;
    const int j = (int)(item % a.faces);
    long long slot = a.bin_starts[item];
    for (int tile_row = box[0] / MDR_TILE; tile_row <= box[1] / MDR_TILE; ++tile_row) {
        for (int tile_col = box[2] / MDR_TILE; tile_col <= box[3] / MDR_TILE; ++tile_col) {
            a.bin_keys[slot] = (b * a.tiles_y + tile_row) * a.tiles_x + tile_col;
            a.bin_faces[slot] = j;
            ++slot;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// forward: one item per MDR_LANES adjacent pixels of a tile row (one pixel per GPU thread; one
// SIMD vector on the CPU). Each pixel i goes through the faces listed for its tile in list order;
// m_i is found on the fly (an online softmax: when a nearer face raises m, the sums so far are
// rescaled by exp((m_old - m_new) / gamma), which is exactly 1 when m stays):
//   T_i = prod_j (1 - D_ij),                 A_i = 1 - T_i
//   W_i = sum_j w_ij + w_b,                  w_ij = D_ij exp((zhat_ij - m_i) / gamma),
//   I_i = (sum_j w_ij C_ij + w_b C_bg) / W_i,   w_b = exp((eps - m_i) / gamma).
// The color sums of CHANNEL_CHUNK channels are held per lane; more channels take more passes
// over the faces, each recomputing the same m_i, W_i and T_i. A face whose box misses the
// pixels costs one test; a pair outside the box or the image does not count.
#define CHANNEL_CHUNK 4
template <typename T>
__device__ void forward_item(const RasterArgs<T>& a, long long item) {
    constexpr int L = MDR_LANES, GROUPS = MDR_TILE / MDR_LANES;  // lane groups per tile row
    const int C = a.channels, HW = a.height * a.pitch, tiles = a.tiles_x * a.tiles_y;
    const long long tile_key = item / (MDR_TILE * GROUPS);  // b * tiles + tile
    const int tile = (int)(tile_key % tiles), b = (int)(tile_key / tiles);
    const int in_tile = (int)(item % (MDR_TILE * GROUPS));
    const int row = tile / a.tiles_x * MDR_TILE + in_tile / GROUPS;
    const int col0 = tile % a.tiles_x * MDR_TILE + in_tile % GROUPS * L, col1 = col0 + L - 1;
    if (row >= a.height) return;  // the bottom tiles stick out of the image
    const T py = pixel_y(row, a);
    T px[L];
    MDR_SIMD for (int lane = 0; lane < L; ++lane) px[lane] = pixel_x(col0 + lane, a);
    const T inv_gamma = T(1 / a.gamma);
    const long long pixel0 = (long long)b * (C + 1) * HW + row * a.pitch + col0;  // channel c at + c * HW
    const long long begin = tile_key == 0 ? 0 : a.tile_ends[tile_key - 1], end = a.tile_ends[tile_key];

    for (int chunk = 0; chunk < mdr_max(C, 1); chunk += CHANNEL_CHUNK) {
        const int chunk_channels = mdr_min(C - chunk, CHANNEL_CHUNK);  // may be 0: silhouette only
        // Start from the background alone: m = eps, so w_b = 1.
        T m[L], weight_sum[L], transmittance[L], color[CHANNEL_CHUNK][L];
        MDR_SIMD for (int lane = 0; lane < L; ++lane) {
            m[lane] = T(a.eps), weight_sum[lane] = T(1), transmittance[lane] = T(1);
            for (int c = 0; c < CHANNEL_CHUNK; ++c) color[c][lane] = T(0);
            for (int c = 0; c < chunk_channels; ++c) color[c][lane] = a.background[chunk + c];
        }
        for (long long entry = begin; entry < end; ++entry) {
            const long long face = (long long)b * a.faces + a.tile_faces[entry];
            const int* box = a.face_boxes + 4 * face;
            if (row < box[0] || row > box[1] || col1 < box[2] || col0 > box[3]) continue;
            const Face<T> f = load_face(a.face_data + FACE_RECORD * face);
            // Most faces touch only some pixels of their box: skip those with no pixel near.
            Pairs<T> q;
            T near[L];
            MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                const int col = col0 + lane;
                near[lane] = eval_boundary(f, px[lane], py, a, q, lane) & (col >= box[2]) & (col <= box[3]) ? T(1) : T(0);
            }
            if (!any_lane(near)) continue;
            T corner_color[3][CHANNEL_CHUNK];  // c_k of this chunk's channels, 0 past the last
            for (int k = 0; k < 3; ++k)
                for (int c = 0; c < CHANNEL_CHUNK; ++c)
                    corner_color[k][c] = c < chunk_channels ? a.face_attrs[(face * 3 + k) * C + chunk + c] : T(0);
            // Silhouettes too find m_i and W_i (unused), so that the loops have no branch.
            T counts[L], m_new[L];
            bool raised = false;
            MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                counts[lane] = (near[lane] != T(0)) & eval_depth(f, a, q, lane) ? T(1) : T(0);
                transmittance[lane] *= counts[lane] != T(0) ? q.one_minus_D[lane] : T(1);
                m_new[lane] = (counts[lane] != T(0)) & (q.zhat[lane] > m[lane]) ? q.zhat[lane] : m[lane];
            }
            for (int lane = 0; lane < L; ++lane) raised |= m_new[lane] != m[lane];
            if (raised) {  // rare once the nearest faces have been seen: most faces lie behind
                MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                    const T rescale = mdr_exp((m[lane] - m_new[lane]) * inv_gamma);
                    weight_sum[lane] *= rescale;
                    for (int c = 0; c < CHANNEL_CHUNK; ++c) color[c][lane] *= rescale;
                    m[lane] = m_new[lane];
                }
            }
            MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                const T w = counts[lane] != T(0) ? q.D[lane] * mdr_exp((q.zhat[lane] - m[lane]) * inv_gamma) : T(0);
                weight_sum[lane] += w;
                for (int c = 0; c < CHANNEL_CHUNK; ++c) {
                    T c_ij = T(0);
                    for (int k = 0; k < 3; ++k) c_ij += q.w_hat[k][lane] * corner_color[k][c];
                    color[c][lane] += w * c_ij;
                }
            }
        }
        T* image = a.image + pixel0;
        for (int c = 0; c < chunk_channels; ++c)
            MDR_SIMD for (int lane = 0; lane < L; ++lane) image[(chunk + c) * HW + lane] = color[c][lane] / weight_sum[lane];
        if (chunk > 0) continue;  // the passes agree on these
        T* aux = a.aux + (long long)b * 3 * HW + row * a.pitch + col0;  // (m_i, W_i, T_i) at + (0, 1, 2) * HW
        MDR_SIMD for (int lane = 0; lane < L; ++lane) {
            image[C * HW + lane] = T(1) - transmittance[lane];
            aux[lane] = m[lane], aux[HW + lane] = weight_sum[lane], aux[2 * HW + lane] = transmittance[lane];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// backward: one item per face j; sums over the pixels i of its box, MDR_LANES adjacent pixels
// at a time (lane sums are added up in a fixed order at the end, so results stay reproducible).
// With gI = dL/dI_i (C values) and gA = dL/dA_i, and m_i held constant (I_i does not depend on it):
//   dL/dC_ij    = gI w_ij / W_i                       ->  dL/dc_k += w^_k dL/dC_ij
//   dL/dw_ij    = gI . (C_ij - I_i) / W_i             =: gw
//   dL/dw^_k    = dL/dC_ij . c_k
//   dL/dzhat_ij = gw w_ij / gamma
//   dL/dx_ij    = gw w_ij (1 - D_ij) + gA D_ij T_i     (x = delta d / sigma; dA/dx_j = D_j T_i
//                                                      needs no division by 1 - D_j)
//   dL/dd_ij    = dL/dx_ij delta / sigma
// Through the nearest edge (a -> b, nearest point q = a + t (b - a), r = p - q; t is optimal or
// clamped, so it contributes nothing):  dd/da = -2 (1 - t) r,  dd/db = -2 t r.
// Depth: dL/dz_ij = -dL/dzhat / (far - near). Perspective, with s = sum_l b~_l / z_l,
// z_ij = 1 / s and w^_k = (b~_k / z_k) / s, for u_k = b~_k / z_k:
//   dL/du_k = (dL/dw^_k - sum_l dL/dw^_l w^_l) / s - dL/dz_ij z_ij^2
//   dL/db~_k = dL/du_k / z_k,   dL/dz_k += -dL/du_k u_k / z_k.
// Orthographic (w^ = b~, z_ij = sum b~_l z_l):  dL/db~_k = dL/dw^_k + dL/dz_ij z_k,
//   dL/dz_k += dL/dz_ij b~_k.
// Clipping (b~_k = max(b_k, 0) / S, S = sum_l max(b_l, 0)):
//   dL/db_k = [b_k > 0] (dL/db~_k - sum_l dL/db~_l b~_l) / S.
// Barycentrics b_k = E_k / A2 with E_k = cross(v_k+1 - p, v_k+2 - p), A2 = cross(v1 - v0, v2 - v0):
//   dL/dE_k = dL/db_k / A2,  dL/dA2 = -sum_k dL/db_k b_k / A2,
//   and d cross(u, w) / du = (w_y, -w_x), d cross(u, w) / dw = (-u_y, u_x).
template <typename T>
__device__ void backward_item(const RasterArgs<T>& a, long long item) {
    constexpr int L = MDR_LANES;
    const int C = a.channels, HW = a.height * a.pitch;
    const int b = (int)(item / a.faces);
    const int* box = a.face_boxes + 4 * item;
    const Face<T> f = load_face(a.face_data + FACE_RECORD * item);  // read only if the box is not empty
    const T inv_gamma = T(1 / a.gamma);
    // Per lane, summed over the box: dL/dx, dL/dy and dL/dz of the corners (x_k at [k], y_k at
    // [3 + k], z_k at [6 + k]). Every term below is linear in gI and gA, so each pass adds the
    // share of its channels (the first pass also the silhouette's).
    T g_corner[9][L];
    for (int v = 0; v < 9; ++v)
        MDR_SIMD for (int lane = 0; lane < L; ++lane) g_corner[v][lane] = T(0);

    for (int chunk = 0; chunk < mdr_max(C, 1); chunk += CHANNEL_CHUNK) {
        const int chunk_channels = mdr_min(C - chunk, CHANNEL_CHUNK);  // may be 0: silhouette only
        const T silhouette = chunk == 0 ? T(1) : T(0);
        T corner_color[3][CHANNEL_CHUNK];  // c_k of this chunk's channels, 0 past the last
        int plane[CHANNEL_CHUNK];  // where channel chunk + c is in image and grad_image (any plane past the last)
        for (int c = 0; c < CHANNEL_CHUNK; ++c) {
            plane[c] = mdr_min(chunk + c, C);
            for (int k = 0; k < 3; ++k) corner_color[k][c] = c < chunk_channels ? a.face_attrs[(item * 3 + k) * C + chunk + c] : T(0);
        }
        T g_attr[3][CHANNEL_CHUNK][L];  // dL/dc_k per lane
        for (int k = 0; k < 3; ++k)
            for (int c = 0; c < CHANNEL_CHUNK; ++c)
                MDR_SIMD for (int lane = 0; lane < L; ++lane) g_attr[k][c][lane] = T(0);

        for (int row = box[0]; row <= box[1]; ++row) {
            const T py = pixel_y(row, a);
            for (int col0 = box[2] - box[2] % L; col0 <= box[3]; col0 += L) {
                const long long pixel0 = (long long)b * (C + 1) * HW + row * a.pitch + col0;  // channel c at + c * HW
                const T* image = a.image + pixel0;
                const T* grad = a.grad_image + pixel0;
                const T* aux = a.aux + (long long)b * 3 * HW + row * a.pitch + col0;  // (m_i, W_i, T_i) at + (0, 1, 2) * HW
                Pairs<T> q;
                T px[L], near[L];
                MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                    const int col = col0 + lane;
                    px[lane] = pixel_x(col, a);
                    near[lane] = eval_boundary(f, px[lane], py, a, q, lane) & (col >= box[2]) & (col <= box[3]) ? T(1) : T(0);
                }
                if (!any_lane(near)) continue;  // as in the forward
                MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                    const bool counts = (near[lane] != T(0)) & eval_depth(f, a, q, lane);
                    const T m = aux[lane], inv_weight_sum = T(1) / aux[HW + lane], transmittance = aux[2 * HW + lane];
                    const T w = q.D[lane] * mdr_exp((q.zhat[lane] - m) * inv_gamma);
                    const T g_color = w * inv_weight_sum;  // dL/dC_ij / gI

                    // Color: dL/dc_k, dL/dw_ij and dL/dw^_k.
                    T g_w = T(0), g_w_hat[3] = {0, 0, 0};
                    for (int c = 0; c < CHANNEL_CHUNK; ++c) {
                        const T grad_c = grad[plane[c] * HW + lane], image_c = image[plane[c] * HW + lane];
                        const T gI = c < chunk_channels ? grad_c : T(0);
                        T color = T(0);
                        for (int k = 0; k < 3; ++k) color += q.w_hat[k][lane] * corner_color[k][c];
                        g_w += gI * (color - image_c);
                        for (int k = 0; k < 3; ++k) {
                            g_w_hat[k] += gI * g_color * corner_color[k][c];
                            g_attr[k][c][lane] += counts ? q.w_hat[k][lane] * g_color * gI : T(0);
                        }
                    }
                    g_w *= inv_weight_sum;
                    const T g_zhat = g_w * w * inv_gamma;
                    const T g_x = silhouette * grad[C * HW + lane] * q.D[lane] * transmittance + g_w * w * q.one_minus_D[lane];

                    // Distance: through the nearest edge.
                    const T g_d = q.delta[lane] * g_x * T(1 / a.sigma);
                    T gx[3], gy[3], gz[3];
                    for (int k = 0; k < 3; ++k) {
                        gx[k] = T(-2) * q.share[k][lane] * q.rx[lane] * g_d;
                        gy[k] = T(-2) * q.share[k][lane] * q.ry[lane] * g_d;
                    }

                    // Depth and interpolation weights -> clipped barycentrics (perspective and
                    // orthographic both computed, one selected).
                    const T g_z_ij = -g_zhat * T(1 / (a.far - a.near));
                    const T z_ij = q.z_ij[lane];
                    T g_w_hat_mean = T(0);
                    for (int k = 0; k < 3; ++k) g_w_hat_mean += g_w_hat[k] * q.w_hat[k][lane];
                    const T g_s = -g_z_ij * z_ij * z_ij;
                    const bool perspective = a.perspective;
                    T g_b_clip[3];
                    for (int k = 0; k < 3; ++k) {
                        const T u = q.b_clip[k][lane] * f.inv_z[k];
                        const T g_u = (g_w_hat[k] - g_w_hat_mean) * z_ij + g_s;
                        g_b_clip[k] = perspective ? g_u * f.inv_z[k] : g_w_hat[k] + g_z_ij * f.z[k];
                        gz[k] = perspective ? -g_u * u * f.inv_z[k] : g_z_ij * q.b_clip[k][lane];
                    }

                    // Clipping -> barycentrics -> corners.
                    T g_clip_mean = T(0);
                    for (int k = 0; k < 3; ++k) g_clip_mean += g_b_clip[k] * q.b_clip[k][lane];
                    T g_area2 = T(0);
                    const T inv_clip_sum = T(1) / q.clip_sum[lane];
                    for (int k = 0; k < 3; ++k) {
                        const T b_k = q.b[k][lane];
                        const T g_b = b_k > T(0) ? (g_b_clip[k] - g_clip_mean) * inv_clip_sum : T(0);
                        const T g_E = g_b * f.inv_area2;
                        g_area2 -= g_b * b_k * f.inv_area2;
                        const int n = k == 2 ? 0 : k + 1, nn = k == 0 ? 2 : k - 1;
                        const T ux = f.x[n] - px[lane], uy = f.y[n] - py;
                        const T wx = f.x[nn] - px[lane], wy = f.y[nn] - py;
                        gx[n] += g_E * wy, gy[n] -= g_E * wx;
                        gx[nn] -= g_E * uy, gy[nn] += g_E * ux;
                    }
                    const T ux = f.x[1] - f.x[0], uy = f.y[1] - f.y[0];
                    const T wx = f.x[2] - f.x[0], wy = f.y[2] - f.y[0];
                    gx[1] += g_area2 * wy, gy[1] -= g_area2 * wx;
                    gx[2] -= g_area2 * uy, gy[2] += g_area2 * ux;
                    gx[0] -= g_area2 * (wy - uy), gy[0] -= g_area2 * (ux - wx);
                    for (int k = 0; k < 3; ++k) {
                        g_corner[k][lane] += counts ? gx[k] : T(0);
                        g_corner[3 + k][lane] += counts ? gy[k] : T(0);
                        g_corner[6 + k][lane] += counts ? gz[k] : T(0);
                    }
                }
            }
        }
        for (int k = 0; k < 3; ++k)
            for (int c = 0; c < chunk_channels; ++c)
                a.grad_attrs[(item * 3 + k) * C + chunk + c] = lane_sum(g_attr[k][c]);
    }
    T* grad_verts = a.grad_verts + 9 * item;  // (corner, axis)
    for (int v = 0; v < 9; ++v) grad_verts[3 * (v % 3) + v / 3] = lane_sum(g_corner[v]);
}

// ---------------------------------------------------------------------------------------------
// Entry points: softras_{setup,bin,forward,backward}_{f32,f64}. One thread per work item.
MDR_ENTRY(softras_setup_f32, setup_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_setup_f64, setup_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_bin_f32, bin_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_bin_f64, bin_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_forward_f32, forward_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_forward_f64, forward_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_backward_f32, backward_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_backward_f64, backward_item<double>, RasterArgs<double>)

#ifndef __CUDACC__
// Let the host adapter check that microdr/raster/kernels.py agrees with this file: ARGS_DTYPE
// with RasterArgs, and FACE_RECORD with FACE_RECORD.
extern "C" long long softras_args_size() { return (long long)sizeof(RasterArgs<float>); }
extern "C" long long softras_face_record() { return FACE_RECORD; }
extern "C" long long softras_tile() { return MDR_TILE; }
extern "C" long long softras_lanes() { return MDR_LANES; }

// The CPU target's stable sort of the bin pairs by tile key (microdr/raster/kernels.py,
// sort_by_tile): a counting sort, one pass to count, one to place in pair order.
extern "C" void softras_sort_by_tile(const long long* bin_keys, const int* bin_faces, int* tile_faces,
                                     long long* tile_ends, long long pairs, long long tiles) {
    for (long long t = 0; t < tiles; ++t) tile_ends[t] = 0;
    for (long long p = 0; p < pairs; ++p) ++tile_ends[bin_keys[p]];
    long long end = 0;  // tile_ends[t] becomes where tile t starts, then moves to its end while filled
    for (long long t = 0; t < tiles; ++t) {
        const long long count = tile_ends[t];
        tile_ends[t] = end;
        end += count;
    }
    for (long long p = 0; p < pairs; ++p) tile_faces[tile_ends[bin_keys[p]]++] = bin_faces[p];
}
#endif
