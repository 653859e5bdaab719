// The soft rasterizer (docs/MODEL.md): forward and hand-written backward.
//
// Five kernels (two more for textures), each a 1-D grid of independent work items that own their
// outputs (no atomics, so results are bitwise reproducible on the CPU whatever the thread count):
//   setup     one item per face (b, j): whether the face is skipped, the box of pixels it can
//             touch (its screen bounding box grown by the cut-off distance), how many tiles
//             (MDR_TILE x MDR_TILE pixels) that box overlaps, and how many chunks (of at most
//             CHUNK_PIXELS pixels, see chunk_shape) the backward splits it into.
//   bin       one item per face: writes one (tile key, face) pair per overlapped tile into the
//             face's slots of the pair list (slots sized by a prefix sum of setup's counts, so
//             nothing can overflow). The launch code then sorts the pairs by tile, stably, so
//             each tile lists its faces in face order.
//   forward   one item per MDR_LANES adjacent pixels of a tile row: loops over the faces listed
//             for its tile whose box meets those pixels and blends them in; saves three
//             aggregates per pixel for the backward.
//   backward  one item per chunk of a face's box (so no item visits more than CHUNK_PIXELS
//             pixels, however large the face): loops over the chunk's pixels in the columns the
//             face can reach from the chunk's rows (reach_columns; a chunk at most
//             REACH_MIN_GROUPS lane groups wide keeps its columns), MDR_LANES at a time,
//             recomputes the pairs and accumulates the face's gradients in registers. A face's
//             first chunk writes its gradients, each other chunk its partial gradients to a slot
//             of its own (zeros for a chunk the face cannot reach).
//   reduce    one item per face: adds the partial gradients of a face's other chunks to the
//             first's, in chunk order (zero for a face of none).
//   backward_textured  the backward of textured renders: the same chunks; each chunk also writes
//             a record of each of its pairs that counts (its footprint in the texture and
//             dL/dC_ij), packed from the place of the chunk's first pixel in its face's box on,
//             and the tiles of texels (MDR_TEXEL_TILE) those footprints touch; the launch code
//             lists the chunks per texel tile.
//   texels    textured renders only: one item per texel tile, adds up the texel gradients of the
//             pair records of the chunks listed for it, in a fixed order.
// Forward and backward evaluate a (pixel, face) pair with the same functions, eval_boundary and
// eval_depth, so they agree exactly on which pairs count. Memory is O(pixels + faces + listed
// pairs + chunks).
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
// face_chunks (B, F) int = chunks of the box (chunk_shape); chunk_starts (B, F) = first chunk of
// each face; chunk_faces (chunks) = b * F + j of each chunk; partial_starts (B, F) = first
// partial slot of each face (a slot per chunk but the first); partials (partial slots, 9 + 3C) =
// a chunk's gradients, laid out as grad_verts then grad_attrs of its face.
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
    int* face_chunks;
    const long long* chunk_starts;
    const long long* chunk_faces;
    const long long* partial_starts;
    T* partials;
    // Textured renders (null texture otherwise): face_attrs are then texture coordinates (B, F, 3, 2)
    // and the C channels are sampled from texture (texture_height, texture_width, C).
    const T* texture;
    const long long* box_starts;       // (B, F): box pixels of the faces before (chunk_first_pair)
    int* texel_footprints;             // (box pixels, 4): r0, r1, c0, c1 of each record's pair's footprint
    T* texel_values;                   // (box pixels, 2 + C): fx, fy and dL/dC_ij of each record's pair
    int* chunk_records;                // (chunks): the records each chunk wrote, from chunk_first_pair on
    int* texel_boxes;                  // (chunks, 4): the texel tiles a chunk's records' footprints touch, as
                                       // face_boxes
    const int* texel_tile_chunks;      // the chunks listed per texel tile, sorted by tile
    const long long* texel_tile_ends;  // (texel tiles): one past each tile's last entry in texel_tile_chunks
    T* grad_texture;                   // like texture
    long long n_items;
    long long chunks;  // backward work items: sum of face_chunks
    int batch, faces, channels, height, width;
    int perspective, cull_backfaces;
    int pitch, tiles_x, tiles_y;  // pitch: row stride of image, aux and grad_image, a multiple of MDR_TILE
    int texture_height, texture_width, texture_wrap, texel_tiles_x;
    double sigma, gamma, eps, distance_cutoff, near, far;
};

// A face as the pair evaluation needs it, precomputed once by setup (FACE_RECORD values per
// face in face_data) so that the per-pair work has no divisions by per-face quantities.
template <typename T>
struct Face {
    T x[3], y[3], z[3];
    T inv_z[3];
    T area2;        // twice the signed screen area; > 0 for counter-clockwise faces
    T orientation;  // sign(area2): +1 or -1
    T inv_len2[3];  // 1 / |edge k|^2, 0 for an edge too short for that to be a normal number
                    // (it counts as a point); edge k runs from corner k to k + 1
};
#define FACE_RECORD 17

// Tiles are MDR_TILE x MDR_TILE pixels; a tile row holds a whole number of lane groups.
#define MDR_TILE 8
static_assert(MDR_TILE % MDR_LANES == 0, "a tile row must hold whole lane groups");

// The backward splits a face's box (rows x cols pixels) into chunks of at most CHUNK_PIXELS,
// one work item each: bands of whole rows of the box where it is at most CHUNK_PIXELS wide
// (a 12 x 11 box: 3 chunks of 5, 5 and 2 rows; its lane groups per row are the box's, as if
// unsplit), else pieces of one row, as wide as an even split of the row allows. Chunk (cr, cc)
// holds rows row0 + cr * band .. + band - 1 and columns col0 + cc * width .. + width - 1,
// clipped to the box; chunks are numbered row-major.
#define CHUNK_PIXELS (MDR_TILE * MDR_TILE)
struct ChunkShape {
    int band, width;  // rows and columns of a chunk
    int across;       // chunks per band
};
MDR_DEVICE ChunkShape chunk_shape(int cols) {
    ChunkShape s;
    // One integer division for a box at most CHUNK_PIXELS wide (every backward item computes
    // this, and a division takes tens of cycles).
    s.across = cols <= CHUNK_PIXELS ? 1 : (cols + CHUNK_PIXELS - 1) / CHUNK_PIXELS;
    s.width = s.across == 1 ? cols : (cols + s.across - 1) / s.across;
    s.band = CHUNK_PIXELS / s.width;
    return s;
}

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
    f.orientation = f.area2 > T(0) ? T(1) : T(-1);
    for (int k = 0; k < 3; ++k) {
        const int n = k == 2 ? 0 : k + 1;
        const T ex = f.x[n] - f.x[k], ey = f.y[n] - f.y[k];
        const T len2 = ex * ex + ey * ey;
        f.inv_len2[k] = len2 >= mdr_tiny<T>() ? T(1) / len2 : T(0);
    }
    return f;
}

template <typename T>
MDR_DEVICE void store_face(const Face<T>& f, T* __restrict__ record) {
    for (int k = 0; k < 3; ++k) {
        record[k] = f.x[k], record[3 + k] = f.y[k], record[6 + k] = f.z[k];
        record[9 + k] = f.inv_z[k], record[14 + k] = f.inv_len2[k];
    }
    record[12] = f.area2, record[13] = f.orientation;
}

template <typename T>
MDR_DEVICE Face<T> load_face(const T* __restrict__ record) {
    Face<T> f;
    for (int k = 0; k < 3; ++k) {
        f.x[k] = record[k], f.y[k] = record[3 + k], f.z[k] = record[6 + k];
        f.inv_z[k] = record[9 + k], f.inv_len2[k] = record[14 + k];
    }
    f.area2 = record[12], f.orientation = record[13];
    return f;
}

// Faces skipped whole: zero screen area (below the smallest normal number counts as zero), a
// corner nearer than `near`, culled back faces, and faces with a coordinate or depth beyond
// sqrt(max) / 8 (or NaN), for which no squared distance or area can overflow
// (microdr/raster/reference.py, coordinate_limit).
template <typename T>
MDR_DEVICE bool face_is_drawn(const Face<T>& f, const RasterArgs<T>& a) {
    const T limit = mdr_sqrt(mdr_largest<T>()) / T(8);
    bool within_limit = true;
    for (int k = 0; k < 3; ++k)
        within_limit = within_limit && mdr_abs(f.x[k]) <= limit && mdr_abs(f.y[k]) <= limit && mdr_abs(f.z[k]) <= limit;
    const T z_min = mdr_min(f.z[0], mdr_min(f.z[1], f.z[2]));
    return within_limit && mdr_abs(f.area2) >= mdr_tiny<T>() && z_min >= T(a.near) &&
           (!a.cull_backfaces || f.area2 > T(0));
}

// Everything about the (pixel, face) pairs of one face and MDR_LANES adjacent pixels that the
// forward uses and the backward differentiates; lane `lane` at [lane] (a structure of arrays,
// so that loops over the lanes vectorize).
template <typename T>
struct Pairs {
    static constexpr int L = MDR_LANES;
    T e[3][L];          // e_k = sign(area2) E_k = |area2| b_k (b_k the barycentrics)
    T b_clip[3][L];     // clipped barycentrics b~_k = max(e_k, 0) / S
    T inv_clip_sum[L];  // 1 / S, S = sum_l max(e_l, 0) (1 where S = 0)
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

// e, delta, d and the nearest point; whether p is inside or within the cut-off distance.
// The barycentrics b_k = E_k / area2 are used only through their signs and the ratios of their
// positive parts, so they are kept as e_k = sign(area2) E_k = |area2| b_k: dividing by area2
// would make the backward's terms grow like 1 / area2 and cancel as a face turns edge-on.
template <typename T>
MDR_DEVICE bool eval_boundary(const Face<T>& f, T px, T py, const RasterArgs<T>& a, Pairs<T>& q, int lane) {
    // E_k: twice the signed area of (p, v_k+1, v_k+2).
    T e[3];
    for (int k = 0; k < 3; ++k) {
        const int n = k == 2 ? 0 : k + 1, nn = k == 0 ? 2 : k - 1;
        const T ux = f.x[n] - px, uy = f.y[n] - py;
        const T wx = f.x[nn] - px, wy = f.y[nn] - py;
        e[k] = q.e[k][lane] = f.orientation * (ux * wy - uy * wx);
    }
    // Inside: every b_k >= 0, which puts p in the face's bounding box. The box test is not
    // redundant in floating point: for a sliver far from p whose edge lines pass near p, the
    // signs of E_k are rounding noise.
    const bool in_box = (px >= mdr_min(f.x[0], mdr_min(f.x[1], f.x[2]))) & (px <= mdr_max(f.x[0], mdr_max(f.x[1], f.x[2]))) &
                        (py >= mdr_min(f.y[0], mdr_min(f.y[1], f.y[2]))) & (py <= mdr_max(f.y[0], mdr_max(f.y[1], f.y[2])));
    const bool inside = (e[0] >= T(0)) & (e[1] >= T(0)) & (e[2] >= T(0)) & in_box;
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

// The clipped barycentrics, depth, weights and D (after eval_boundary); whether the pair
// counts as far as they go: some b_k > 0, and z_ij <= far.
template <bool PERSPECTIVE, typename T>
MDR_DEVICE bool eval_depth(const Face<T>& f, const RasterArgs<T>& a, Pairs<T>& q, int lane) {
    T clip_sum = T(0);
    for (int k = 0; k < 3; ++k) clip_sum += mdr_max(q.e[k][lane], T(0));
    // The b_k sum to 1, so some b_k > 0; only rounding in E_k (a face tiny or thin next to its
    // distance from p) can leave none. Such a pair does not count, and gets stand-in weights of
    // 1/3 so that the values the lane loops compute (and then drop) stay finite.
    const bool clip_ok = clip_sum > T(0);
    const T inv_clip_sum = q.inv_clip_sum[lane] = T(1) / (clip_ok ? clip_sum : T(1));
    T b_clip[3];
    for (int k = 0; k < 3; ++k)
        b_clip[k] = q.b_clip[k][lane] = clip_ok ? mdr_max(q.e[k][lane], T(0)) * inv_clip_sum : T(1) / T(3);
    // Perspective: z_ij = 1 / sum_l b~_l / z_l, w^_k = (b~_k / z_k) z_ij; orthographic:
    // z_ij = sum_l b~_l z_l, w^ = b~.
    T z_ij;
    if constexpr (PERSPECTIVE) {
        T inv_z_sum = T(0);
        for (int k = 0; k < 3; ++k) inv_z_sum += b_clip[k] * f.inv_z[k];
        z_ij = T(1) / inv_z_sum;
        for (int k = 0; k < 3; ++k) q.w_hat[k][lane] = b_clip[k] * f.inv_z[k] * z_ij;
    } else {
        z_ij = T(0);
        for (int k = 0; k < 3; ++k) z_ij += b_clip[k] * f.z[k];
        for (int k = 0; k < 3; ++k) q.w_hat[k][lane] = b_clip[k];
    }
    q.z_ij[lane] = z_ij;
    q.zhat[lane] = (T(a.far) - z_ij) * T(1 / (a.far - a.near));

    // D = sigmoid(x) and 1 - D = sigmoid(-x) from one exp of -|x| = -d / sigma, so neither
    // cancels or overflows: with e = exp(-|x|), the larger is 1 / (1 + e) and the smaller e / (1 + e).
    const T e = mdr_exp(-q.d[lane] * T(1 / a.sigma));
    const T larger = T(1) / (T(1) + e);
    const bool inside = q.delta[lane] > T(0);
    q.D[lane] = inside ? larger : e * larger;
    q.one_minus_D[lane] = inside ? e * larger : larger;
    // z_ij is a mean of the corner depths, all >= near for a drawn face, so z_ij >= near holds.
    // The far bound is tested on z_ij clamped to the corners' range, which changes nothing but
    // rounding: without it a face lying on the far plane would lose pixels at random.
    const T z_in_range = mdr_min(mdr_max(z_ij, mdr_min(f.z[0], mdr_min(f.z[1], f.z[2]))), mdr_max(f.z[0], mdr_max(f.z[1], f.z[2])));
    return clip_ok & (z_in_range <= T(a.far));
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
    T count = T(0);  // exact: a sum of at most MDR_LANES ones
    MDR_SIMD_SUM(count) for (int lane = 0; lane < MDR_LANES; ++lane) count += mask[lane];
    return count != T(0);
}

template <typename T>
MDR_DEVICE T pixel_x(int col, const RasterArgs<T>& a) { return T(2 * col + 1 - a.width) / T(a.height); }
template <typename T>
MDR_DEVICE T pixel_y(int row, const RasterArgs<T>& a) { return T(a.height - 2 * row - 1) / T(a.height); }

// ---------------------------------------------------------------------------------------------
// Textures (docs/MODEL.md, "Textures"): C_ij = texture(uv_ij), uv_ij = sum_k w^_k uv_k, sampled
// bilinearly with texel centers at half-integers: x = u Wt - 1/2 across, y = (1 - v) Ht - 1/2 down
// (OBJ's v = 0 is the image's bottom row, texture row 0 its top), wrapping around or clamped to
// the edge texels. The forward and the backward sample through these same functions.

// The two texels along one axis of `size` texels around x (texel units, centers at integers) and
// the weight of the second, frac in [0, 1). Indices always lie in [0, size), whatever x is (a NaN
// or huge x only comes from pairs that do not count, whose values are dropped).
// (Integer arithmetic rather than boolean selects: GCC's vectorizer finds no vector type for
// the bools of `wrap & ...`, which kept whole lane loops scalar.)
template <typename T>
MDR_DEVICE void texel_axis(T x, int size, int wrap, int& i0, int& i1, T& frac) {
    x = x == x ? x : T(0);
    const T wrapped = x - T(size) * mdr_floor(x / T(size)), clamped = mdr_min(mdr_max(x, T(-1)), T(size));
    x = wrap ? wrapped : clamped;  // in [-1, size]
    const T x0 = mdr_floor(x);
    frac = x - x0;
    const int i = (int)x0;
    const int first = i - size * (i >= size ? wrap : 0);  // wrapped, x rounded up to size: texel 0
    const int second = first + 1 - size * (first + 1 >= size ? wrap : 0);
    i0 = mdr_min(mdr_max(first, 0), size - 1);
    i1 = mdr_min(mdr_max(second, 0), size - 1);
}

// The bilinear footprints of MDR_LANES texture coordinates (u, v), lane `lane` at [lane]: the
// texels around each (rows r0, r1 and columns c0, c1, indices into the texture) and the weights
// of the second row and column. A structure of arrays of plain numbers, as Pairs: GCC vectorizes
// no lane loop that holds a structure value (it stays an aggregate in memory). Kept this small
// (the weights are derived when used) so that the GPU's backward holds it in registers.
template <typename T>
struct Footprints {
    int r0[MDR_LANES], r1[MDR_LANES], c0[MDR_LANES], c1[MDR_LANES];
    T fx[MDR_LANES], fy[MDR_LANES];
};

template <typename T>
MDR_DEVICE void texel_footprint(T u, T v, const RasterArgs<T>& a, Footprints<T>& s, int lane) {
    texel_axis(u * T(a.texture_width) - T(0.5), a.texture_width, a.texture_wrap, s.c0[lane], s.c1[lane], s.fx[lane]);
    texel_axis((T(1) - v) * T(a.texture_height) - T(0.5), a.texture_height, a.texture_wrap, s.r0[lane], s.r1[lane], s.fy[lane]);
}

// The bilinear weight beta_t of texel t of a footprint with weights fx, fy of its second column
// and row (t = 0: (r0, c0), 1: (r0, c1), 2: (r1, c0), 3: (r1, c1), row-major).
template <typename T>
MDR_DEVICE T bilinear_weight(T fx, T fy, int t) {
    return (t % 2 == 0 ? T(1) - fx : fx) * (t < 2 ? T(1) - fy : fy);
}

// The texture's channels chunk .. chunk + CH - 1 (one past the last reads the last instead)
// sampled at the footprints of the lanes whose mask is set: sample[c][lane] and, with SLOPES,
// its derivatives along u and v, d_u[c][lane] and d_v[c][lane]: dx/du = Wt and dy/dv = -Ht
// (x across, y down) times the bilinear sample's slopes along x and y (where clamping puts
// both texels of an axis on one, the slope along it is 0). The other lanes get 0.
// A loop over the lanes set rather than a lane loop: the CPU has no gathers fast enough (GCC
// emulates them, a scalar load and an insert per lane and texel value, 12 per lane for RGB),
// and only about a third of a lane group's lanes count.
template <typename T, int CH, bool SLOPES>
MDR_DEVICE void sample_lanes(const Footprints<T>& s, const T* mask, int chunk, const RasterArgs<T>& a,
                             T (*sample)[MDR_LANES], T (*d_u)[MDR_LANES], T (*d_v)[MDR_LANES]) {
    unsigned lanes = 0;
    for (int lane = 0; lane < MDR_LANES; ++lane) lanes |= (mask[lane] != T(0) ? 1u : 0u) << lane;
    for (int c = 0; c < CH; ++c) {
        MDR_SIMD for (int lane = 0; lane < MDR_LANES; ++lane) {
            sample[c][lane] = T(0);
            if constexpr (SLOPES) d_u[c][lane] = T(0), d_v[c][lane] = T(0);
        }
    }
    for (; lanes != 0; lanes &= lanes - 1) {
        const int lane = mdr_lowest_bit(lanes);
        const int row0 = s.r0[lane] * a.texture_width, row1 = s.r1[lane] * a.texture_width;
        const T* t00 = a.texture + (row0 + s.c0[lane]) * a.channels;
        const T* t01 = a.texture + (row0 + s.c1[lane]) * a.channels;
        const T* t10 = a.texture + (row1 + s.c0[lane]) * a.channels;
        const T* t11 = a.texture + (row1 + s.c1[lane]) * a.channels;
        const T fx = s.fx[lane], fy = s.fy[lane];
        for (int c = 0; c < CH; ++c) {
            const int channel = mdr_min(chunk + c, a.channels - 1);
            const T top = t00[channel] + (t01[channel] - t00[channel]) * fx;
            const T bottom = t10[channel] + (t11[channel] - t10[channel]) * fx;
            sample[c][lane] = top + (bottom - top) * fy;
            if constexpr (SLOPES) {
                d_u[c][lane] = ((t01[channel] - t00[channel]) * (T(1) - fy) + (t11[channel] - t10[channel]) * fy) * T(a.texture_width);
                d_v[c][lane] = (top - bottom) * T(a.texture_height);
            }
        }
    }
}

// The footprint of lane `lane`'s interpolated texture coordinate uv_ij = sum_k w^_k uv_k, where
// uv = (u_0, v_0, u_1, ...) are the face's corners' (face_attrs is (B, F, 3, 2) when textured;
// read where used rather than held, which would take registers the GPU's backward lacks).
template <typename T>
MDR_DEVICE void pair_footprint(const Pairs<T>& q, const T* __restrict__ uv, int lane, const RasterArgs<T>& a, Footprints<T>& s) {
    T u = T(0), v = T(0);
    for (int k = 0; k < 3; ++k) u += q.w_hat[k][lane] * uv[2 * k], v += q.w_hat[k][lane] * uv[2 * k + 1];
    texel_footprint(u, v, a, s, lane);
}

// The texels kernel's items take tiles of MDR_TEXEL_TILE x MDR_TEXEL_TILE texels (texel rows and
// columns >> MDR_TEXEL_TILE_SHIFT), row-major, the last row and column of tiles maybe cut short.
#define MDR_TEXEL_TILE_SHIFT 6
#define MDR_TEXEL_TILE (1 << MDR_TEXEL_TILE_SHIFT)

// ---------------------------------------------------------------------------------------------
// setup: one item per face. A pair can count only if the pixel is inside the face or within
// sqrt(distance_cutoff) of it, so the face's box is its screen bounding box grown by that much,
// converted to the pixels whose centers it holds. A thousandth of a pixel of slack keeps
// rounding from ever dropping a pixel; eval_boundary decides exactly.
#define BOX_SLACK 1e-3
// The first and last columns whose centers lie in [x0, x1] (screen units, give or take the
// slack), and the first and last rows whose centers lie in [y0, y1]: x = (2c + 1 - W) / H and
// y = (H - 2r - 1) / H inverted, clamped to the image in floating point (a far-off face must not
// overflow a conversion to int; the caller converts once it has checked first <= last).
template <typename T>
MDR_DEVICE T first_column(T x0, const RasterArgs<T>& a) {
    return mdr_max(mdr_ceil((x0 * T(a.height) + T(a.width) - T(1)) / T(2) - T(BOX_SLACK)), T(0));
}
template <typename T>
MDR_DEVICE T last_column(T x1, const RasterArgs<T>& a) {
    return mdr_min(mdr_floor((x1 * T(a.height) + T(a.width) - T(1)) / T(2) + T(BOX_SLACK)), T(a.width - 1));
}
template <typename T>
MDR_DEVICE T first_row(T y1, const RasterArgs<T>& a) {
    return mdr_max(mdr_ceil((T(a.height) - T(1) - y1 * T(a.height)) / T(2) - T(BOX_SLACK)), T(0));
}
template <typename T>
MDR_DEVICE T last_row(T y0, const RasterArgs<T>& a) {
    return mdr_min(mdr_floor((T(a.height) - T(1) - y0 * T(a.height)) / T(2) + T(BOX_SLACK)), T(a.height - 1));
}
template <typename T>
__device__ void setup_item(const RasterArgs<T>& a, long long item) {
    int* box = a.face_boxes + 4 * item;
    const Face<T> f = make_face(a.face_verts + 9 * item);
    box[0] = 1, box[1] = 0, box[2] = 1, box[3] = 0;  // empty
    a.face_tiles[item] = 0, a.face_chunks[item] = 0;
    if (!face_is_drawn(f, a)) return;
    store_face(f, a.face_data + FACE_RECORD * item);
    const T grow = mdr_sqrt(T(a.distance_cutoff));
    const T col0 = first_column(mdr_min(f.x[0], mdr_min(f.x[1], f.x[2])) - grow, a);
    const T col1 = last_column(mdr_max(f.x[0], mdr_max(f.x[1], f.x[2])) + grow, a);
    const T row0 = first_row(mdr_max(f.y[0], mdr_max(f.y[1], f.y[2])) + grow, a);
    const T row1 = last_row(mdr_min(f.y[0], mdr_min(f.y[1], f.y[2])) - grow, a);
    if (!(col0 <= col1 && row0 <= row1)) return;
    box[0] = (int)row0, box[1] = (int)row1, box[2] = (int)col0, box[3] = (int)col1;
    a.face_tiles[item] = (box[1] / MDR_TILE - box[0] / MDR_TILE + 1) * (box[3] / MDR_TILE - box[2] / MDR_TILE + 1);
    const ChunkShape chunks = chunk_shape(box[3] - box[2] + 1);
    a.face_chunks[item] = chunks.across * ((box[1] - box[0] + chunks.band) / chunks.band);
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
// The color sums of CH = CHANNEL_CHUNK channels (3: RGB) are held per lane; more channels take more
// passes over the faces, each recomputing the same m_i, W_i and T_i. Silhouettes alone (CH = 0)
// skip the blend (m_i and W_i stay the background's). A face whose box misses the pixels costs
// one test; a pair outside the box or the image does not count. TEXTURED: the colors C_ij are
// sampled from the texture (at most CHANNEL_CHUNK channels) instead of interpolated.
#define CHANNEL_CHUNK 3
template <typename T, int CH, bool PERSPECTIVE, bool TEXTURED>
__device__ void forward_lanes(const RasterArgs<T>& a, long long item) {
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
            for (int c = 0; c < CH; ++c) color[c][lane] = T(0);
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
            T counts[L];
            MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                counts[lane] = (near[lane] != T(0)) & eval_depth<PERSPECTIVE>(f, a, q, lane) ? T(1) : T(0);
                transmittance[lane] *= counts[lane] != T(0) ? q.one_minus_D[lane] : T(1);
            }
            if constexpr (CH == 0) continue;
            T corner_color[3][CHANNEL_CHUNK];  // c_k of this chunk's channels, 0 past the last
            for (int k = 0; k < 3; ++k)
                for (int c = 0; c < CH; ++c)
                    corner_color[k][c] = !TEXTURED && c < chunk_channels ? a.face_attrs[(face * 3 + k) * C + chunk + c] : T(0);
            T m_new[L];
            bool raised = false;
            MDR_SIMD for (int lane = 0; lane < L; ++lane)
                m_new[lane] = (counts[lane] != T(0)) & (q.zhat[lane] > m[lane]) ? q.zhat[lane] : m[lane];
            for (int lane = 0; lane < L; ++lane) raised |= m_new[lane] != m[lane];
            if (raised) {  // rare once the nearest faces have been seen: most faces lie behind
                MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                    const T rescale = mdr_exp((m[lane] - m_new[lane]) * inv_gamma);
                    weight_sum[lane] *= rescale;
                    for (int c = 0; c < CH; ++c) color[c][lane] *= rescale;
                    m[lane] = m_new[lane];
                }
            }
            Footprints<T> footprint;  // textured only
            T w[L];
            MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                w[lane] = counts[lane] != T(0) ? q.D[lane] * mdr_exp((q.zhat[lane] - m[lane]) * inv_gamma) : T(0);
                weight_sum[lane] += w[lane];
                if constexpr (TEXTURED) {
                    pair_footprint(q, a.face_attrs + face * 6, lane, a, footprint);
                } else {
                    for (int c = 0; c < CH; ++c) {
                        T c_ij = T(0);
                        for (int k = 0; k < 3; ++k) c_ij += q.w_hat[k][lane] * corner_color[k][c];
                        color[c][lane] += w[lane] * c_ij;
                    }
                }
            }
            if constexpr (TEXTURED) {
                T sample[CH][L];
                sample_lanes<T, CH, false>(footprint, counts, chunk, a, sample, nullptr, nullptr);
                MDR_SIMD for (int lane = 0; lane < L; ++lane)
                    for (int c = 0; c < CH; ++c) color[c][lane] += c < chunk_channels ? w[lane] * sample[c][lane] : T(0);
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

template <typename T>
__device__ void forward_item(const RasterArgs<T>& a, long long item) {
    // One instance per case, so that the lane loops carry no code of the others.
    if (a.channels == 0)
        a.perspective ? forward_lanes<T, 0, true, false>(a, item) : forward_lanes<T, 0, false, false>(a, item);
    else if (a.texture)
        a.perspective ? forward_lanes<T, CHANNEL_CHUNK, true, true>(a, item) : forward_lanes<T, CHANNEL_CHUNK, false, true>(a, item);
    else
        a.perspective ? forward_lanes<T, CHANNEL_CHUNK, true, false>(a, item) : forward_lanes<T, CHANNEL_CHUNK, false, false>(a, item);
}

// A backward chunk's texel pair records (textured renders): where the next goes, and the texels
// (rows[0] .. rows[1], cols[0] .. cols[1]) the footprints written so far touch.
struct TexelRecords {
    long long next;
    int rows[2], cols[2];
};

// Appends the texel pair record of lane `lane`'s pair, which counts: its footprint (in s) and
// dL/dC_ij (g_sample[c][lane] for this chunk's channels).
template <typename T>
MDR_DEVICE void write_texel_pair(const RasterArgs<T>& a, TexelRecords& records, const Footprints<T>& s, int lane,
                                 const T (*g_sample)[MDR_LANES], int chunk, int chunk_channels) {
    const long long pair = records.next++;
    int* footprint = a.texel_footprints + 4 * pair;
    records.rows[0] = mdr_min(records.rows[0], mdr_min(s.r0[lane], s.r1[lane]));
    records.rows[1] = mdr_max(records.rows[1], mdr_max(s.r0[lane], s.r1[lane]));
    records.cols[0] = mdr_min(records.cols[0], mdr_min(s.c0[lane], s.c1[lane]));
    records.cols[1] = mdr_max(records.cols[1], mdr_max(s.c0[lane], s.c1[lane]));
    footprint[0] = s.r0[lane], footprint[1] = s.r1[lane], footprint[2] = s.c0[lane], footprint[3] = s.c1[lane];
    T* values = a.texel_values + (2 + a.channels) * pair;
    values[0] = s.fx[lane], values[1] = s.fy[lane];
    for (int c = 0; c < chunk_channels; ++c) values[2 + chunk + c] = g_sample[c][lane];
}

// Values per face corner in face_attrs and grad_attrs: the C attributes, or (textured) the 2
// texture coordinates.
template <typename T>
MDR_DEVICE int corner_values(const RasterArgs<T>& a) { return a.texture ? 2 : a.channels; }

// ---------------------------------------------------------------------------------------------
// The columns, among col0 .. col1, of rows row0 .. row1 whose pixels face f can reach (a pixel
// inside f, or within r = sqrt(distance_cutoff) of it): false when none. A pixel p in reach has
// its nearest point q of f within r, so q.y is within r of the rows' centers and |p.x - q.x| <= r:
// p's column is within r of the x-extent of f's part in the band of y within r of the rows. That
// part is a polygon whose corners are f's corners in the band and the crossings of f's edges with
// the band's two lines. For rounding, the band and the extent are grown by a margin (BOX_SLACK of
// a pixel and 16 ulps of f's largest coordinate), and the columns found as setup finds the box's.
// (Out of line on the GPU: inlined, it made the float64 backward spill on sm_75 and sm_80.)
template <typename T>
MDR_DEVICE_CALL bool reach_columns(const Face<T>& f, int row0, int row1, int col0, int col1, const RasterArgs<T>& a,
                              int* columns) {
    T size = T(1);
    for (int k = 0; k < 3; ++k) size = mdr_max(size, mdr_max(mdr_abs(f.x[k]), mdr_abs(f.y[k])));
    const T reach = mdr_sqrt(T(a.distance_cutoff)) + T(2 * BOX_SLACK) / T(a.height) + T(16) * mdr_epsilon<T>() * size;
    const T y0 = pixel_y(row1, a) - reach, y1 = pixel_y(row0, a) + reach;
    T x0 = mdr_largest<T>(), x1 = -mdr_largest<T>();
    for (int k = 0; k < 3; ++k) {
        const int n = k == 2 ? 0 : k + 1;
        const bool in_band = (f.y[k] >= y0) & (f.y[k] <= y1);
        x0 = in_band ? mdr_min(x0, f.x[k]) : x0, x1 = in_band ? mdr_max(x1, f.x[k]) : x1;
        const T low = mdr_min(f.y[k], f.y[n]), high = mdr_max(f.y[k], f.y[n]);
        for (const T y : {y0, y1}) {
            const bool crosses = (low <= y) & (y <= high) & (low < high);
            const T x = f.x[k] + (y - f.y[k]) / (f.y[n] - f.y[k]) * (f.x[n] - f.x[k]);
            x0 = crosses ? mdr_min(x0, x) : x0, x1 = crosses ? mdr_max(x1, x) : x1;
        }
    }
    const T first = mdr_max(first_column(x0 - reach, a), T(col0)), last = mdr_min(last_column(x1 + reach, a), T(col1));
    if (!(first <= last)) return false;
    columns[0] = (int)first, columns[1] = (int)last;
    return true;
}

// Chunks at most this many lane groups wide are not narrowed (backward_chunk).
#define REACH_MIN_GROUPS 4

// backward: one item per chunk of face j's box (see backward_chunk); sums over the pixels i of
// the chunk in the columns j can reach from its rows (reach_columns, for a chunk wider than
// REACH_MIN_GROUPS lane groups; the other pixels' pairs cannot count), MDR_LANES adjacent pixels
// at a time from the first of those columns (not tile-aligned as in the forward: 5 such columns
// then take one lane group per row, not one or two). Lane sums are added up in a fixed order at
// the end, and the reduce adds the chunks in chunk order, so results stay reproducible.
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
// Clipping, on e_k = o E_k (o = sign(area2), a constant; see eval_boundary), with
// E_k = cross(v_k+1 - p, v_k+2 - p): b~_k = max(b_k, 0) / sum_l max(b_l, 0) equals
// max(e_k, 0) / S with S = sum_l max(e_l, 0), and no area2 is left to differentiate:
//   dL/de_k = [e_k > 0] (dL/db~_k - sum_l dL/db~_l b~_l) / S,   dL/dE_k = o dL/de_k,
//   and d cross(u, w) / du = (w_y, -w_x), d cross(u, w) / dw = (-u_y, u_x).
// Textured (C_ij = texture(uv_ij), uv_ij = sum_k w^_k uv_k, bilinear weights beta_t(uv_ij)):
//   dL/duv_ij = dL/dC_ij . dC_ij/duv,   dL/dw^_k = dL/duv_ij . uv_k,   dL/duv_k += w^_k dL/duv_ij,
//   dL/dtexel_t += beta_t dL/dC_ij: the pair's footprint and dL/dC_ij are written, not added,
//   into the chunk's next texel pair record (records), in the order the pairs are visited
//   (row-major); reduce_texels then adds the texels' terms up.
// This function: face `face` (b * F + j) over the pixels of rows region[0] .. region[1] and
// columns region[2] .. region[3] (inclusive, inside its box); writes the sums to out_verts
// (9 values, laid out as grad_verts) and out_attrs (3 corner_values(a) values, as grad_attrs).
template <typename T, int CH, bool PERSPECTIVE, bool TEXTURED>
__device__ void backward_lanes(const RasterArgs<T>& a, long long face, const int* region, T* __restrict__ out_verts,
                               T* __restrict__ out_attrs, TexelRecords& records) {
    constexpr int L = MDR_LANES;
    const int C = a.channels, HW = a.height * a.pitch;
    const int b = (int)(face / a.faces);
    const Face<T> f = load_face(a.face_data + FACE_RECORD * face);
    const T inv_gamma = T(1 / a.gamma);
    // Per lane, summed over the region: dL/dx, dL/dy and dL/dz of the corners (x_k at [k], y_k at
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
        for (int c = 0; c < CH; ++c) {
            plane[c] = mdr_min(chunk + c, C);
            for (int k = 0; k < 3; ++k)
                corner_color[k][c] = !TEXTURED && c < chunk_channels ? a.face_attrs[(face * 3 + k) * C + chunk + c] : T(0);
        }
        const T* uv = a.face_attrs + face * 6;  // textured: the corners' texture coordinates
        T g_attr[3][CHANNEL_CHUNK][L];  // dL/dc_k per lane
        for (int k = 0; k < 3; ++k)
            for (int c = 0; c < CH; ++c)
                MDR_SIMD for (int lane = 0; lane < L; ++lane) g_attr[k][c][lane] = T(0);

        for (int row = region[0]; row <= region[1]; ++row) {
            const T py = pixel_y(row, a);
            for (int start = region[2]; start <= region[3]; start += L) {
                // Lanes col0 .. col0 + L - 1 take the pixels start .. start + L - 1 of the row; at the
                // right edge col0 moves left to stay inside the padded row (the lanes before start
                // are masked: the previous group had them).
                const int col0 = mdr_min(start, a.pitch - L);
                const long long pixel0 = (long long)b * (C + 1) * HW + row * a.pitch + col0;  // channel c at + c * HW
                const T* image = a.image + pixel0;
                const T* grad = a.grad_image + pixel0;
                const T* aux = a.aux + (long long)b * 3 * HW + row * a.pitch + col0;  // (m_i, W_i, T_i) at + (0, 1, 2) * HW
                Pairs<T> q;
                T px[L], near[L];
                MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                    const int col = col0 + lane;
                    px[lane] = pixel_x(col, a);
                    near[lane] = eval_boundary(f, px[lane], py, a, q, lane) & (col >= start) & (col <= region[3]) ? T(1) : T(0);
                }
                if (!any_lane(near)) continue;  // as in the forward
                // Textured: first which lanes count and their footprints, then the texture sampled at
                // those (sample_lanes), then the lane loop; each lane's footprint and dL/dC_ij are
                // written into its texel pair record after it (a scatter inside would keep it from
                // vectorizing).
                Footprints<T> footprint;
                T g_sample[CHANNEL_CHUNK][L], counted[L];
                T sample[CHANNEL_CHUNK][L], d_u[CHANNEL_CHUNK][L], d_v[CHANNEL_CHUNK][L];  // textured only
                if constexpr (TEXTURED) {
                    MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                        counted[lane] = (near[lane] != T(0)) & eval_depth<PERSPECTIVE>(f, a, q, lane) ? T(1) : T(0);
                        pair_footprint(q, uv, lane, a, footprint);
                    }
                    sample_lanes<T, CH, true>(footprint, counted, chunk, a, sample, d_u, d_v);
                }
                MDR_SIMD for (int lane = 0; lane < L; ++lane) {
                    bool counts;
                    if constexpr (TEXTURED)
                        counts = counted[lane] != T(0);
                    else
                        counts = (near[lane] != T(0)) & eval_depth<PERSPECTIVE>(f, a, q, lane);
                    T g_x = silhouette * grad[C * HW + lane] * q.D[lane] * aux[2 * HW + lane];  // the silhouette's part
                    T gx[3] = {0, 0, 0}, gy[3] = {0, 0, 0}, gz[3] = {0, 0, 0};

                    // Color: dL/dc_k, dL/dw_ij and dL/dw^_k (none without channels).
                    T g_zhat = T(0), g_w_hat[3] = {0, 0, 0};
                    if constexpr (CH > 0) {
                        const T m = aux[lane], inv_weight_sum = T(1) / aux[HW + lane];
                        // zhat_ij <= m_i for a pair that counts, but this zhat_ij may round an ulp
                        // above the forward's (the compiler may fuse its multiply-adds differently
                        // here), and for a small gamma exp(ulp / gamma) overflows: clamp to m_i.
                        const T w = q.D[lane] * mdr_exp(mdr_min(q.zhat[lane] - m, T(0)) * inv_gamma);
                        const T g_color = w * inv_weight_sum;  // dL/dC_ij / gI
                        T g_w = T(0), g_u = T(0), g_v = T(0);  // g_u, g_v: dL/duv_ij when textured
                        if constexpr (TEXTURED) {
                            for (int c = 0; c < CH; ++c) {  // (to CH, not chunk_channels: a loop of fixed length vectorizes)
                                const T grad_c = grad[plane[c] * HW + lane], image_c = image[plane[c] * HW + lane];
                                const T gI = c < chunk_channels ? grad_c : T(0);  // any channel past the last: gI = 0
                                g_u += gI * g_color * d_u[c][lane], g_v += gI * g_color * d_v[c][lane];
                                g_w += gI * (sample[c][lane] - image_c);
                                g_sample[c][lane] = g_color * gI;
                            }
                        } else {
                            for (int c = 0; c < CH; ++c) {
                                const T grad_c = grad[plane[c] * HW + lane], image_c = image[plane[c] * HW + lane];
                                const T gI = c < chunk_channels ? grad_c : T(0);
                                T color = T(0);
                                for (int k = 0; k < 3; ++k) color += q.w_hat[k][lane] * corner_color[k][c];
                                for (int k = 0; k < 3; ++k) {
                                    g_w_hat[k] += gI * g_color * corner_color[k][c];
                                    g_attr[k][c][lane] += counts ? q.w_hat[k][lane] * g_color * gI : T(0);
                                }
                                g_w += gI * (color - image_c);
                            }
                        }
                        if constexpr (TEXTURED) {
                            for (int k = 0; k < 3; ++k) {
                                g_w_hat[k] = g_u * uv[2 * k] + g_v * uv[2 * k + 1];
                                g_attr[k][0][lane] += counts ? q.w_hat[k][lane] * g_u : T(0);
                                g_attr[k][1][lane] += counts ? q.w_hat[k][lane] * g_v : T(0);
                            }
                        }
                        g_w *= inv_weight_sum;
                        g_zhat = g_w * w * inv_gamma;
                        g_x += g_w * w * q.one_minus_D[lane];
                    }

                    // Distance: through the nearest edge.
                    const T g_d = q.delta[lane] * g_x * T(1 / a.sigma);
                    for (int k = 0; k < 3; ++k) {
                        gx[k] = T(-2) * q.share[k][lane] * q.rx[lane] * g_d;
                        gy[k] = T(-2) * q.share[k][lane] * q.ry[lane] * g_d;
                    }

                    // Depth and interpolation weights -> clipped barycentrics -> E_k -> corners.
                    // A silhouette depends on neither.
                    if constexpr (CH > 0) {
                        const T g_z_ij = -g_zhat * T(1 / (a.far - a.near));
                        const T z_ij = q.z_ij[lane];
                        T g_w_hat_mean = T(0);
                        for (int k = 0; k < 3; ++k) g_w_hat_mean += g_w_hat[k] * q.w_hat[k][lane];
                        const T g_s = -g_z_ij * z_ij * z_ij;
                        T g_b_clip[3];
                        for (int k = 0; k < 3; ++k) {
                            const T u = q.b_clip[k][lane] * f.inv_z[k];
                            const T g_u = (g_w_hat[k] - g_w_hat_mean) * z_ij + g_s;
                            g_b_clip[k] = PERSPECTIVE ? g_u * f.inv_z[k] : g_w_hat[k] + g_z_ij * f.z[k];
                            gz[k] = PERSPECTIVE ? -g_u * u * f.inv_z[k] : g_z_ij * q.b_clip[k][lane];
                        }

                        // Clipping -> E_k -> corners.
                        T g_clip_mean = T(0);
                        for (int k = 0; k < 3; ++k) g_clip_mean += g_b_clip[k] * q.b_clip[k][lane];
                        const T inv_clip_sum = q.inv_clip_sum[lane];
                        for (int k = 0; k < 3; ++k) {
                            const T g_e = q.e[k][lane] > T(0) ? (g_b_clip[k] - g_clip_mean) * inv_clip_sum : T(0);
                            const T g_E = f.orientation * g_e;
                            const int n = k == 2 ? 0 : k + 1, nn = k == 0 ? 2 : k - 1;
                            const T ux = f.x[n] - px[lane], uy = f.y[n] - py;
                            const T wx = f.x[nn] - px[lane], wy = f.y[nn] - py;
                            gx[n] += g_E * wy, gy[n] -= g_E * wx;
                            gx[nn] -= g_E * uy, gy[nn] += g_E * ux;
                        }
                    }
                    for (int k = 0; k < 3; ++k) {
                        g_corner[k][lane] += counts ? gx[k] : T(0);
                        g_corner[3 + k][lane] += counts ? gy[k] : T(0);
                        g_corner[6 + k][lane] += counts ? gz[k] : T(0);
                    }
                }
                if constexpr (TEXTURED) {
                    for (int lane = 0; lane < L; ++lane)  // a lane counts only inside the region, from start on
                        if (counted[lane] != T(0))
                            write_texel_pair(a, records, footprint, lane, g_sample, chunk, chunk_channels);
                }
            }
        }
        for (int k = 0; k < 3; ++k) {
            if constexpr (TEXTURED) {
                for (int d = 0; d < 2; ++d) out_attrs[k * 2 + d] = lane_sum(g_attr[k][d]);
            } else {
                for (int c = 0; c < mdr_min(chunk_channels, CH); ++c)  // (chunk_channels <= CH: a hint for the compiler)
                    out_attrs[k * C + chunk + c] = lane_sum(g_attr[k][c]);
            }
        }
    }
    for (int v = 0; v < 9; ++v) out_verts[3 * (v % 3) + v / 3] = lane_sum(g_corner[v]);  // (corner, axis)
}

// The pixels of chunk `chunk` of face `face`'s box: rows region[0] .. region[1], columns
// region[2] .. region[3] (see chunk_shape).
template <typename T>
MDR_DEVICE void chunk_region(const RasterArgs<T>& a, long long face, int chunk, int* region) {
    const int* box = a.face_boxes + 4 * face;
    const ChunkShape shape = chunk_shape(box[3] - box[2] + 1);
    const int band = shape.across == 1 ? chunk : chunk / shape.across, piece = chunk - band * shape.across;
    const int row0 = box[0] + band * shape.band, col0 = box[2] + piece * shape.width;
    region[0] = row0, region[1] = mdr_min(row0 + shape.band - 1, box[1]);
    region[2] = col0, region[3] = mdr_min(col0 + shape.width - 1, box[3]);
}

// Where the texel pair records of the chunk of face `face` with pixels `region` (chunk_region)
// go (textured renders): from the place of its first pixel in the face's box on (box_starts
// counts the faces' box pixels). A chunk is whole rows of the box or a piece of one row, so its
// pixels' places follow one another and its records, at most one per pixel, stay in them.
template <typename T>
MDR_DEVICE long long chunk_first_pair(const RasterArgs<T>& a, long long face, const int* region) {
    const int* box = a.face_boxes + 4 * face;
    return a.box_starts[face] + (long long)(region[0] - box[0]) * (box[3] - box[2] + 1) + region[2] - box[2];
}

// One backward item: chunk `item` of all faces' chunks (chunk_faces names its face; its place
// among the face's chunks gives its pixels, clipped to the box, then, if the chunk is wider than
// REACH_MIN_GROUPS lane groups, to the columns the face reaches from its rows, see reach_columns).
// Textured, it also leaves how many texel pair records it wrote (chunk_records) and the tiles of
// texels their footprints touch (texel_boxes: row0, row1, col0, col1 in tiles, empty when
// row0 > row1, as face_boxes).
template <typename T, int CH, bool PERSPECTIVE, bool TEXTURED>
__device__ void backward_chunk(const RasterArgs<T>& a, long long item) {
    const long long face = a.chunk_faces[item];
    const int chunk = (int)(item - a.chunk_starts[face]);
    int region[4];
    chunk_region(a, face, chunk, region);
    TexelRecords records = {0, {a.texture_height, -1}, {a.texture_width, -1}};  // none, touching no texel
    if constexpr (TEXTURED) records.next = chunk_first_pair(a, face, region);
    const long long first_pair = records.next;
    // The first chunk writes the face's gradients (the reduce adds the others' partials to them).
    const int values = corner_values(a);
    T* partial = chunk == 0 ? nullptr : a.partials + (a.partial_starts[face] + chunk - 1) * (9 + 3 * values);
    T* out_verts = chunk == 0 ? a.grad_verts + 9 * face : partial;
    T* out_attrs = chunk == 0 ? a.grad_attrs + 3 * values * face : partial + 9;
    // Narrowing a chunk under REACH_MIN_GROUPS lane groups wide saves at most a few lane groups
    // per row, less than reach_columns costs (its divisions and square root).
    // (backward_lanes loads the face again: keeping this copy alive through it would cost registers.)
    const bool narrow = region[3] - region[2] + 1 <= REACH_MIN_GROUPS * MDR_LANES;
    if (narrow || reach_columns(load_face(a.face_data + FACE_RECORD * face), region[0], region[1], region[2], region[3], a, region + 2)) {
        backward_lanes<T, CH, PERSPECTIVE, TEXTURED>(a, face, region, out_verts, out_attrs, records);
    } else {  // no pair of the chunk counts
        for (int v = 0; v < 9; ++v) out_verts[v] = T(0);
        for (int v = 0; v < 3 * values; ++v) out_attrs[v] = T(0);
    }
    if constexpr (TEXTURED) {
        a.chunk_records[item] = (int)(records.next - first_pair);
        int* texel_box = a.texel_boxes + 4 * item;
        const bool empty = records.rows[1] < 0;
        texel_box[0] = empty ? 1 : records.rows[0] >> MDR_TEXEL_TILE_SHIFT, texel_box[1] = empty ? 0 : records.rows[1] >> MDR_TEXEL_TILE_SHIFT;
        texel_box[2] = empty ? 1 : records.cols[0] >> MDR_TEXEL_TILE_SHIFT, texel_box[3] = empty ? 0 : records.cols[1] >> MDR_TEXEL_TILE_SHIFT;
    }
}

template <typename T>
__device__ void backward_item(const RasterArgs<T>& a, long long item) {
    if (a.channels == 0)
        a.perspective ? backward_chunk<T, 0, true, false>(a, item) : backward_chunk<T, 0, false, false>(a, item);
    else
        a.perspective ? backward_chunk<T, CHANNEL_CHUNK, true, false>(a, item) : backward_chunk<T, CHANNEL_CHUNK, false, false>(a, item);
}

// The textured backward is a kernel of its own: in one with the others, its registers would be
// theirs too (on the GPU a kernel takes the most registers any of its paths needs).
template <typename T>
__device__ void backward_textured_item(const RasterArgs<T>& a, long long item) {
    a.perspective ? backward_chunk<T, CHANNEL_CHUNK, true, true>(a, item) : backward_chunk<T, CHANNEL_CHUNK, false, true>(a, item);
}

// ---------------------------------------------------------------------------------------------
// reduce: one item per face; a face's first chunk wrote its gradients, to which the partials of
// its other chunks are added, in chunk order; a face of no chunk (not drawn, or its box off the
// image) gets zeros.
template <typename T>
__device__ void reduce_item(const RasterArgs<T>& a, long long item) {
    const int chunks = a.face_chunks[item], A = corner_values(a);
    T* __restrict__ grad_verts = a.grad_verts + 9 * item;
    T* __restrict__ grad_attrs = a.grad_attrs + 3 * A * item;
    if (chunks == 0) {
        for (int v = 0; v < 9; ++v) grad_verts[v] = T(0);
        for (int v = 0; v < 3 * A; ++v) grad_attrs[v] = T(0);
    }
    for (int chunk = 1; chunk < chunks; ++chunk) {  // chunk-major: each chunk's values are adjacent
        const T* __restrict__ partial = a.partials + (a.partial_starts[item] + chunk - 1) * (9 + 3 * A);
        for (int v = 0; v < 9; ++v) grad_verts[v] += partial[v];
        for (int v = 0; v < 3 * A; ++v) grad_attrs[v] += partial[9 + v];
    }
}

// ---------------------------------------------------------------------------------------------
// reduce_texels: one item per texel tile (see MDR_TEXEL_TILE): dL/dtexture[t] = sum over the
// pairs that count of beta_t dL/dC_ij, for the texels t of the tile, added in a fixed order: the
// chunks listed for the tile in chunk order (faces in order b * F + j, a face's chunks row-major),
// each chunk's records in the order it wrote them (its pixels row-major), each pair's footprint
// texels in order t = 0 .. 3. A tile's texels start at zero.
// An item per tile of texels rather than per texel: most texels of a large texture get no term,
// and a chunk's records are read once per tile their footprints touch, not once per term.
template <typename T>
__device__ void reduce_texels_item(const RasterArgs<T>& a, long long item) {
    const int C = a.channels;  // at most CHANNEL_CHUNK in a textured render
    const int tile_row = (int)(item / a.texel_tiles_x), tile_col = (int)(item % a.texel_tiles_x);
    const int row0 = tile_row * MDR_TEXEL_TILE, row1 = mdr_min(row0 + MDR_TEXEL_TILE, a.texture_height);
    const int col0 = tile_col * MDR_TEXEL_TILE, col1 = mdr_min(col0 + MDR_TEXEL_TILE, a.texture_width);
    for (int row = row0; row < row1; ++row)
        for (int v = col0 * C; v < col1 * C; ++v) a.grad_texture[(long long)row * a.texture_width * C + v] = T(0);
    const long long begin = item == 0 ? 0 : a.texel_tile_ends[item - 1], end = a.texel_tile_ends[item];
    for (long long entry = begin; entry < end; ++entry) {
        const long long chunk = a.texel_tile_chunks[entry], face = a.chunk_faces[chunk];
        int region[4];
        chunk_region(a, face, (int)(chunk - a.chunk_starts[face]), region);
        const long long first = chunk_first_pair(a, face, region);
        for (long long pair = first; pair < first + a.chunk_records[chunk]; ++pair) {
            const int* footprint = a.texel_footprints + 4 * pair;
            // Read once, before the sums' stores (which the compiler must assume may overwrite them),
            // and over a loop of fixed length (with a loop to C the kernel took 1.5 times as long).
            const T* values = a.texel_values + (2 + C) * pair;
            const T fx = values[0], fy = values[1];
            T g[CHANNEL_CHUNK];
            for (int c = 0; c < CHANNEL_CHUNK; ++c) g[c] = c < C ? values[2 + c] : T(0);
            for (int t = 0; t < 4; ++t) {
                const int row = footprint[t / 2], col = footprint[2 + t % 2];
                if ((row >> MDR_TEXEL_TILE_SHIFT) != tile_row || (col >> MDR_TEXEL_TILE_SHIFT) != tile_col) continue;
                const T weight = bilinear_weight(fx, fy, t);
                T* grad = a.grad_texture + ((long long)row * a.texture_width + col) * C;
                for (int c = 0; c < CHANNEL_CHUNK; ++c)
                    if (c < C) grad[c] += weight * g[c];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: softras_{setup,bin,forward,backward,reduce,backward_textured,texels}_{f32,f64}.
// One thread per work item.
MDR_ENTRY(softras_setup_f32, setup_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_setup_f64, setup_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_bin_f32, bin_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_bin_f64, bin_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_forward_f32, forward_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_forward_f64, forward_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_backward_f32, backward_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_backward_f64, backward_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_reduce_f32, reduce_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_reduce_f64, reduce_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_backward_textured_f32, backward_textured_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_backward_textured_f64, backward_textured_item<double>, RasterArgs<double>)
MDR_ENTRY(softras_texels_f32, reduce_texels_item<float>, RasterArgs<float>)
MDR_ENTRY(softras_texels_f64, reduce_texels_item<double>, RasterArgs<double>)

#ifndef __CUDACC__
// Let the host adapter check that microdr/raster/kernels.py agrees with this file: ARGS_DTYPE
// with RasterArgs, and FACE_RECORD with FACE_RECORD.
extern "C" long long softras_args_size() { return (long long)sizeof(RasterArgs<float>); }
extern "C" long long softras_face_record() { return FACE_RECORD; }
extern "C" long long softras_tile() { return MDR_TILE; }
extern "C" long long softras_lanes() { return MDR_LANES; }
extern "C" long long softras_texel_tile() { return MDR_TEXEL_TILE; }

// Turns counts per tile into where each tile's entries start (in place); returns the total.
static long long counts_to_starts(long long* tile_ends, long long tiles) {
    long long end = 0;
    for (long long t = 0; t < tiles; ++t) {
        const long long count = tile_ends[t];
        tile_ends[t] = end;
        end += count;
    }
    return end;
}

// The CPU target's stable sort of (key, value) pairs by key (microdr/raster/kernels.py,
// sort_by_tile: the bin pairs by tile): a counting sort, one pass to count, one to place in pair
// order.
extern "C" void softras_sort_by_tile(const long long* bin_keys, const int* bin_faces, int* tile_faces,
                                     long long* tile_ends, long long pairs, long long tiles) {
    for (long long t = 0; t < tiles; ++t) tile_ends[t] = 0;
    for (long long p = 0; p < pairs; ++p) ++tile_ends[bin_keys[p]];
    counts_to_starts(tile_ends, tiles);  // each start then moves to its tile's end while filled
    for (long long p = 0; p < pairs; ++p) tile_faces[tile_ends[bin_keys[p]]++] = bin_faces[p];
}

// The CPU target's listing of chunks per tile of texels (microdr/raster/kernels.py,
// list_chunks_per_texel_tile): each chunk listed for each tile of its box of tiles (texel_boxes,
// (chunks, 4), empty when row0 > row1), in chunk order within a tile. Called twice: with a null
// tile_chunks it counts, leaves where each tile's list starts in tile_ends and returns how many
// listings there are; then it lists, and tile_ends ends one past each tile's last.
extern "C" long long softras_list_chunks_per_texel_tile(const int* texel_boxes, long long chunks, long long tiles_across,
                                                        long long tiles, int* tile_chunks, long long* tile_ends) {
    if (!tile_chunks)
        for (long long t = 0; t < tiles; ++t) tile_ends[t] = 0;
    for (long long chunk = 0; chunk < chunks; ++chunk) {
        const int* box = texel_boxes + 4 * chunk;
        for (long long row = box[0]; row <= box[1]; ++row)
            for (long long col = box[2]; col <= box[3]; ++col) {
                long long& end = tile_ends[row * tiles_across + col];
                if (tile_chunks) tile_chunks[end] = (int)chunk;
                ++end;
            }
    }
    if (tile_chunks) return tiles ? tile_ends[tiles - 1] : 0;
    return counts_to_starts(tile_ends, tiles);
}
#endif
