// The soft rasterizer (../shared/MODEL.md): forward and hand-written backward.
//
// Four kernels, each a 1-D grid of independent work items that own their outputs (no atomics,
// so results are bitwise reproducible on the CPU whatever the thread count):
//   setup     one item per face (b, j): whether the face is skipped, the box of pixels it can
//             touch (its screen bounding box grown by the cut-off distance), and how many
//             tiles (TILE x TILE pixels) that box overlaps.
//   bin       one item per face: writes one (tile key, face) pair per overlapped tile into the
//             face's slots of the pair list (slots sized by a prefix sum of setup's counts, so
//             nothing can overflow). The launch code then sorts the pairs by tile, stably, so
//             each tile lists its faces in face order.
//   forward   one item per row of a tile: loops over the faces listed for its tile whose box
//             meets the row and blends them into the row's pixels; saves three aggregates
//             per pixel for the backward.
//   backward  one item per face (b, j): loops over the pixels of its box, recomputes the pair
//             and accumulates the face's gradients in registers.
// Forward and backward evaluate a (pixel, face) pair with the same function, eval_pair, so
// they agree exactly on which pairs count. Memory is O(pixels + faces + listed pairs).
//
// Layouts (row-major, contiguous): face_verts (B, F, 3, 3) = screen x, y and view depth z per
// corner; face_attrs (B, F, 3, C); image (B, C + 1, H, W); aux (B, 3, H, W) = (m_i, W_i, T_i);
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
    int tile, tiles_x, tiles_y;
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

// Everything about one (pixel, face) pair that the forward uses and the backward differentiates.
template <typename T>
struct Pair {
    T b[3];          // barycentrics b_k
    T b_clip[3];     // clipped barycentrics b~_k
    T clip_sum;      // sum_l max(b_l, 0)
    T inv_z_sum;     // sum_l b~_l / z_l (perspective)
    T w_hat[3];      // interpolation weights w^_k
    T z_ij, zhat;    // depth and normalized inverse depth
    T d;             // squared distance to the boundary
    int edge;        // the nearest edge runs from corner `edge` to corner `edge + 1`
    T t;             // where on that edge the nearest point lies, in [0, 1]
    T rx, ry;        // p minus the nearest point
    bool inside;
    T D, one_minus_D;  // sigmoid(x) and sigmoid(-x), x = delta d / sigma
};

// Outside pairs are first tested against the edge *lines*: the distance to the boundary is at
// least the distance to any edge line the pixel lies beyond, so a pair beyond the cut-off from
// one of those lines is skipped before the segment distances are computed. The margin keeps
// rounding in that cheap test from ever skipping a pair that the exact test would keep.
#define LINE_TEST_MARGIN 1.25

// Evaluates the pair of pixel center (px, py) and a drawn face. Returns false for a skipped pair.
template <typename T>
MDR_DEVICE bool eval_pair(const Face<T>& f, T px, T py, const RasterArgs<T>& a, Pair<T>& q) {
    // b_k: signed area of (p, v_k+1, v_k+2) over the face's.
    T area_k[3];
    for (int k = 0; k < 3; ++k) {
        const int n = k == 2 ? 0 : k + 1, nn = k == 0 ? 2 : k - 1;
        const T ux = f.x[n] - px, uy = f.y[n] - py;
        const T wx = f.x[nn] - px, wy = f.y[nn] - py;
        area_k[k] = ux * wy - uy * wx;
        q.b[k] = area_k[k] * f.inv_area2;
    }
    q.inside = q.b[0] >= T(0) && q.b[1] >= T(0) && q.b[2] >= T(0);
    const T cutoff = T(a.distance_cutoff);
    if (!q.inside) {
        // Squared distance to the line through v_k+1, v_k+2 (edge k+1): area_k^2 / |edge|^2.
        for (int k = 0; k < 3; ++k) {
            const int n = k == 2 ? 0 : k + 1;
            if (q.b[k] < T(0) && area_k[k] * area_k[k] * f.inv_len2[n] > T(LINE_TEST_MARGIN) * cutoff) return false;
        }
    }

    // d: squared distance to the nearest of the three edge segments.
    q.d = T(0);
    q.edge = -1;
    for (int k = 0; k < 3; ++k) {
        const int n = k == 2 ? 0 : k + 1;
        const T ex = f.x[n] - f.x[k], ey = f.y[n] - f.y[k];
        const T tx = px - f.x[k], ty = py - f.y[k];
        const T t = mdr_min(mdr_max((tx * ex + ty * ey) * f.inv_len2[k], T(0)), T(1));
        const T rx = tx - t * ex, ry = ty - t * ey;
        const T dk = rx * rx + ry * ry;
        if (q.edge < 0 || dk < q.d) {
            q.d = dk;
            q.edge = k;
            q.t = t;
            q.rx = rx;
            q.ry = ry;
        }
    }
    if (!q.inside && q.d > cutoff) return false;

    q.clip_sum = T(0);
    for (int k = 0; k < 3; ++k) q.clip_sum += mdr_max(q.b[k], T(0));
    const T inv_clip_sum = T(1) / q.clip_sum;
    for (int k = 0; k < 3; ++k) q.b_clip[k] = mdr_max(q.b[k], T(0)) * inv_clip_sum;
    if (a.perspective) {
        q.inv_z_sum = T(0);
        for (int k = 0; k < 3; ++k) q.inv_z_sum += q.b_clip[k] * f.inv_z[k];
        q.z_ij = T(1) / q.inv_z_sum;
        for (int k = 0; k < 3; ++k) q.w_hat[k] = q.b_clip[k] * f.inv_z[k] * q.z_ij;
    } else {
        q.z_ij = T(0);
        for (int k = 0; k < 3; ++k) {
            q.w_hat[k] = q.b_clip[k];
            q.z_ij += q.b_clip[k] * f.z[k];
        }
    }
    if (!(q.z_ij >= T(a.near) && q.z_ij <= T(a.far))) return false;
    q.zhat = (T(a.far) - q.z_ij) / T(a.far - a.near);

    // D = sigmoid(x) and 1 - D = sigmoid(-x) from one exp of -|x|, so neither cancels or
    // overflows: with e = exp(-|x|), the larger is 1 / (1 + e) and the smaller e / (1 + e).
    const T x = (q.inside ? q.d : -q.d) / T(a.sigma);
    const T e = mdr_exp(q.inside ? -x : x);
    const T larger = T(1) / (T(1) + e);
    q.D = q.inside ? larger : e * larger;
    q.one_minus_D = q.inside ? e * larger : larger;
    return true;
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
    a.face_tiles[item] = (box[1] / a.tile - box[0] / a.tile + 1) * (box[3] / a.tile - box[2] / a.tile + 1);
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
    for (int tile_row = box[0] / a.tile; tile_row <= box[1] / a.tile; ++tile_row) {
        for (int tile_col = box[2] / a.tile; tile_col <= box[3] / a.tile; ++tile_col) {
            a.bin_keys[slot] = (b * a.tiles_y + tile_row) * a.tiles_x + tile_col;
            a.bin_faces[slot] = j;
            ++slot;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// forward: one item per row of a tile (TILE pixels). Each pixel i of the row goes through the
// faces listed for its tile in list order; m_i is found on the fly (an online softmax: when a
// nearer face raises m, the sums so far are rescaled by exp((m_old - m_new) / gamma)):
//   T_i = prod_j (1 - D_ij),                 A_i = 1 - T_i
//   W_i = sum_j w_ij + w_b,                  w_ij = D_ij exp((zhat_ij - m_i) / gamma),
//   I_i = (sum_j w_ij C_ij + w_b C_bg) / W_i,   w_b = exp((eps - m_i) / gamma).
// The running sums live in the outputs themselves: aux = (m_i, W_i, T_i), which the backward
// needs, and the image. A face whose box misses the row costs one test for the whole row, and
// one that meets it is evaluated only at the columns of its box.
template <typename T>
__device__ void forward_item(const RasterArgs<T>& a, long long item) {
    const int C = a.channels, HW = a.height * a.width, tiles = a.tiles_x * a.tiles_y;
    const long long tile_key = item / a.tile;  // b * tiles + tile
    const int tile = (int)(tile_key % tiles), b = (int)(tile_key / tiles);
    const int row = tile / a.tiles_x * a.tile + (int)(item % a.tile);
    const int first_col = tile % a.tiles_x * a.tile, last_col = mdr_min(first_col + a.tile, a.width) - 1;
    if (row >= a.height) return;  // the bottom tiles stick out of the image
    const T py = pixel_y(row, a);
    const T inv_gamma = T(1) / T(a.gamma);
    T* image = a.image + (long long)b * (C + 1) * HW + row * a.width;  // (c, col) at image[c * HW + col]
    T* m = a.aux + (long long)b * 3 * HW + row * a.width;
    T* weight_sum = m + HW;
    T* transmittance = m + 2 * HW;

    for (int col = first_col; col <= last_col; ++col) {
        // The background alone: m = eps, so w_b = 1.
        m[col] = T(a.eps), weight_sum[col] = T(1), transmittance[col] = T(1);
        for (int c = 0; c < C; ++c) image[c * HW + col] = a.background[c];
    }
    const long long begin = tile_key == 0 ? 0 : a.tile_ends[tile_key - 1], end = a.tile_ends[tile_key];
    for (long long entry = begin; entry < end; ++entry) {
        const long long face = (long long)b * a.faces + a.tile_faces[entry];
        const int* box = a.face_boxes + 4 * face;
        if (row < box[0] || row > box[1]) continue;
        const int from = mdr_max(box[2], first_col), to = mdr_min(box[3], last_col);
        if (from > to) continue;
        const Face<T> f = load_face(a.face_data + FACE_RECORD * face);
        const T* attrs = a.face_attrs + face * 3 * C;
        for (int col = from; col <= to; ++col) {
            Pair<T> q;
            if (!eval_pair(f, pixel_x(col, a), py, a, q)) continue;
            transmittance[col] *= q.one_minus_D;
            if (C == 0) continue;  // a silhouette alone needs no color blend
            if (q.zhat > m[col]) {
                const T rescale = mdr_exp((m[col] - q.zhat) * inv_gamma);
                weight_sum[col] *= rescale;
                for (int c = 0; c < C; ++c) image[c * HW + col] *= rescale;
                m[col] = q.zhat;
            }
            const T w = q.D * mdr_exp((q.zhat - m[col]) * inv_gamma);
            weight_sum[col] += w;
            for (int c = 0; c < C; ++c)
                image[c * HW + col] += w * (q.w_hat[0] * attrs[c] + q.w_hat[1] * attrs[C + c] + q.w_hat[2] * attrs[2 * C + c]);
        }
    }
    for (int col = first_col; col <= last_col; ++col) {
        for (int c = 0; c < C; ++c) image[c * HW + col] /= weight_sum[col];
        image[C * HW + col] = T(1) - transmittance[col];
    }
}

// ---------------------------------------------------------------------------------------------
// backward: one item per face j; sums over the pixels i of its box. With gI = dL/dI_i (C values)
// and gA = dL/dA_i, and m_i held constant (I_i does not depend on it):
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
    const int C = a.channels, HW = a.height * a.width;
    const int b = (int)(item / a.faces);
    const int* box = a.face_boxes + 4 * item;
    const Face<T> f = load_face(a.face_data + FACE_RECORD * item);  // read only if the box is not empty
    const T* attrs = a.face_attrs + item * 3 * C;
    T* grad_attrs = a.grad_attrs + item * 3 * C;
    for (int k = 0; k < 3 * C; ++k) grad_attrs[k] = T(0);
    T gx[3] = {0, 0, 0}, gy[3] = {0, 0, 0}, gz[3] = {0, 0, 0};
    const T inv_gamma = T(1) / T(a.gamma);
    const T* image_b = a.image + (long long)b * (C + 1) * HW;
    const T* grad_b = a.grad_image + (long long)b * (C + 1) * HW;
    const T* aux_b = a.aux + (long long)b * 3 * HW;

    for (int row = box[0]; row <= box[1]; ++row) {
        for (int col = box[2]; col <= box[3]; ++col) {
            const T px = pixel_x(col, a), py = pixel_y(row, a);
            Pair<T> q;
            if (!eval_pair(f, px, py, a, q)) continue;
            const int pix = row * a.width + col;
            const T transmittance = aux_b[2 * HW + pix];
            T g_x = grad_b[C * HW + pix] * q.D * transmittance;  // the silhouette's part

            // Color (none without attribute channels: the forward blended nothing, m_i and W_i
            // are the background's): dL/dC_ij, dL/dw_ij, dL/dc_k and dL/dw^_k.
            T g_zhat = T(0), g_w_hat[3] = {0, 0, 0};
            if (C > 0) {
                const T m = aux_b[pix], weight_sum = aux_b[HW + pix];
                const T w = q.D * mdr_exp((q.zhat - m) * inv_gamma);
                const T coef = w / weight_sum;
                T g_w = T(0);
                for (int c = 0; c < C; ++c) {
                    const T gI = grad_b[c * HW + pix];
                    const T color = q.w_hat[0] * attrs[c] + q.w_hat[1] * attrs[C + c] + q.w_hat[2] * attrs[2 * C + c];
                    g_w += gI * (color - image_b[c * HW + pix]);
                    const T g_color = gI * coef;
                    for (int k = 0; k < 3; ++k) {
                        grad_attrs[k * C + c] += q.w_hat[k] * g_color;
                        g_w_hat[k] += g_color * attrs[k * C + c];
                    }
                }
                g_w /= weight_sum;
                g_zhat = g_w * w * inv_gamma;
                g_x += g_w * w * q.one_minus_D;
            }

            // Distance: through the nearest edge.
            const T g_d = (q.inside ? g_x : -g_x) / T(a.sigma);
            const int e0 = q.edge, e1 = q.edge == 2 ? 0 : q.edge + 1;
            gx[e0] += T(-2) * (T(1) - q.t) * q.rx * g_d;
            gy[e0] += T(-2) * (T(1) - q.t) * q.ry * g_d;
            gx[e1] += T(-2) * q.t * q.rx * g_d;
            gy[e1] += T(-2) * q.t * q.ry * g_d;

            // Depth and interpolation weights -> clipped barycentrics.
            const T g_z_ij = -g_zhat / T(a.far - a.near);
            T g_b_clip[3];
            if (a.perspective) {
                const T g_w_hat_mean = g_w_hat[0] * q.w_hat[0] + g_w_hat[1] * q.w_hat[1] + g_w_hat[2] * q.w_hat[2];
                const T g_s = -g_z_ij * q.z_ij * q.z_ij;
                for (int k = 0; k < 3; ++k) {
                    const T u = q.b_clip[k] * f.inv_z[k];
                    const T g_u = (g_w_hat[k] - g_w_hat_mean) * q.z_ij + g_s;
                    g_b_clip[k] = g_u * f.inv_z[k];
                    gz[k] -= g_u * u * f.inv_z[k];
                }
            } else {
                for (int k = 0; k < 3; ++k) {
                    g_b_clip[k] = g_w_hat[k] + g_z_ij * f.z[k];
                    gz[k] += g_z_ij * q.b_clip[k];
                }
            }

            // Clipping -> barycentrics -> corners.
            const T g_clip_mean = g_b_clip[0] * q.b_clip[0] + g_b_clip[1] * q.b_clip[1] + g_b_clip[2] * q.b_clip[2];
            T g_area2 = T(0);
            for (int k = 0; k < 3; ++k) {
                const T g_b = q.b[k] > T(0) ? (g_b_clip[k] - g_clip_mean) / q.clip_sum : T(0);
                const T g_E = g_b * f.inv_area2;
                g_area2 -= g_b * q.b[k] * f.inv_area2;
                const int n = k == 2 ? 0 : k + 1, nn = k == 0 ? 2 : k - 1;
                const T ux = f.x[n] - px, uy = f.y[n] - py;
                const T wx = f.x[nn] - px, wy = f.y[nn] - py;
                gx[n] += g_E * wy, gy[n] -= g_E * wx;
                gx[nn] -= g_E * uy, gy[nn] += g_E * ux;
            }
            const T ux = f.x[1] - f.x[0], uy = f.y[1] - f.y[0];
            const T wx = f.x[2] - f.x[0], wy = f.y[2] - f.y[0];
            gx[1] += g_area2 * wy, gy[1] -= g_area2 * wx;
            gx[2] -= g_area2 * uy, gy[2] += g_area2 * ux;
            gx[0] -= g_area2 * (wy - uy), gy[0] -= g_area2 * (ux - wx);
        }
    }
    T* grad_verts = a.grad_verts + 9 * item;
    for (int k = 0; k < 3; ++k) grad_verts[3 * k] = gx[k], grad_verts[3 * k + 1] = gy[k], grad_verts[3 * k + 2] = gz[k];
}

// ---------------------------------------------------------------------------------------------
// Entry points: softras_{setup,bin,forward,backward}_{f32,f64}. One thread per work item.
#define MDR_KERNEL(name, item_fn, T)                                                 \
    extern "C" __global__ void name(const RasterArgs<T> args) {                       \
        const long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x;      \
        if (item < args.n_items) item_fn<T>(args, item);                              \
    }                                                                                 \
    MDR_HOST_LAUNCHER(name, RasterArgs<T>)

MDR_KERNEL(softras_setup_f32, setup_item, float)
MDR_KERNEL(softras_setup_f64, setup_item, double)
MDR_KERNEL(softras_bin_f32, bin_item, float)
MDR_KERNEL(softras_bin_f64, bin_item, double)
MDR_KERNEL(softras_forward_f32, forward_item, float)
MDR_KERNEL(softras_forward_f64, forward_item, double)
MDR_KERNEL(softras_backward_f32, backward_item, float)
MDR_KERNEL(softras_backward_f64, backward_item, double)

#ifndef __CUDACC__
// Let the host adapter check that microdr/raster/kernels.py agrees with this file: ARGS_DTYPE
// with RasterArgs, and FACE_RECORD with FACE_RECORD.
extern "C" long long softras_args_size() { return (long long)sizeof(RasterArgs<float>); }
extern "C" long long softras_face_record() { return FACE_RECORD; }
#endif
