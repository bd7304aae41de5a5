/* The ingest's compiled kernels (astromer.kernels): the twins of six vectorised numpy/pyarrow steps.
 * Four serve the text readers (astromer.surveys.base), whose members (the files of an archive) lie
 * in one buffer: indexing the tar headers, finding the members' comment headers, reading numbers from
 * those header lines and parsing their rows. Two serve the quality flags
 * (astromer.lake.schema): order statistics inside each curve, and the whole flagging of curves in
 * time order. Each gives exactly what its twin
 * gives, or returns False where its input is not what it handles, and the caller then runs the
 * twin. The loops run without the GIL, so the threads of one Dask worker work side by side.
 *
 *     tar_headers(data, header_blocks, sizes, typeflags) -> int
 *
 * Walk the 512-byte ustar headers of an uncompressed tar held in data, header to header: the block
 * index of each header, its member's size and type flag go into the int64 buffers (room for as many
 * headers as data has blocks); returns how many. Returns -1 (the caller then takes the numpy index or
 * the member-by-member walk) unless every header carries the ustar magic, a plain octal size (11 digits
 * and a NUL or space) and a correct checksum, no GNU long name or pax header (L, K, x, g) comes, every
 * member lies inside data, and nothing but zero bytes follows the first zero block.
 *
 *     scan_members(data, starts, sizes, comment, body_starts, rows, missing, header_counts,
 *                  header_starts, header_ends) -> bool
 *
 * For member i (data[starts[i] : starts[i] + sizes[i]]): its leading lines that begin with the
 * ``comment`` byte (at most max_lines = len(header_starts) // len(starts) of them, else False),
 * as spans without their newline in header_starts/ends[i * max_lines + k]; where its body
 * starts; how many lines the body holds (a last line without a newline counts, and sets
 * missing[i]). The buffers are int64 (missing: uint8), filled in place.
 *
 *     parse_spans(data, starts, ends, out, ncols, delimiter) -> bool
 *
 * ``out`` is a writable C-contiguous float64 buffer of ncols * rows items, filled column by column
 * (out[c * rows + r]) from ``rows`` lines: the spans data[starts[k]:ends[k]] (int64) read one after
 * the other as if they were joined, without joining them (one span: a whole text). A line is
 * ``number (delimiter number){ncols-1}`` ended by "\n" or "\r\n" (the last line of a span may
 * lack it); a number is ``[+-]? (digits [. digits?] | . digits) ([eE] [+-]? digits)?``.
 *
 * Anything else (an empty line, a doubled delimiter, a missing or extra field, nan, inf, text, more
 * or fewer lines than ``rows``) returns False with ``out`` partly written: the caller then uses
 * pyarrow's parser and, failing that, the row-by-row reader that names the bad rows. So it
 * accepts a subset of what pyarrow accepts and must give the same doubles on it: every value is
 * correctly rounded, by exact arithmetic when the decimal fits (Clinger's fast path: a mantissa up
 * to 2^53 times or divided by an exact power of ten up to 1e22) and by strtod in the "C" locale
 * otherwise.
 *
 *     line_fields(data, starts, ends, columns, out) -> int
 *
 * The fields of the lines data[starts[k]:ends[k]] (int64 spans, no newline), split at single spaces:
 * for each wanted field columns[j] (int64) the number it holds goes into out[j * lines + k] (float64,
 * read as parse_spans reads a number). Returns how many fields every line holds, or -1 unless every
 * line is strictly regular: printable ASCII without a double quote, fields separated by exactly one
 * space (none empty, no leading or trailing space), the same number of fields on every line, more
 * than every wanted column, and each wanted field a number and nothing else. The caller then reads the lines
 * with pyarrow's CSV reader or one by one (the compiled reading accepts a subset of what those accept
 * and gives the same values on it).
 *
 *     select_ranks(values, starts, lengths, ranks, out) -> bool
 *
 * For curve i (values[starts[i] : starts[i] + lengths[i]], float64) and each of its m ranks
 * (ranks[i * m + j], int64, m = len(ranks) // len(starts)): the value of that rank in the curve's
 * ascending order (what sorting the curve and indexing would give), into out[i * m + j]; NaN for a
 * rank outside the curve. One pass per curve for ranks near either end (the percentiles of the
 * quality flags), quickselect on a copy for the others: O(length) instead of a sort.
 * False (the caller sorts) if the values hold a NaN, whose place in an order is not defined.
 *
 *     flag_curves(mjd, mag, err, offsets, flags, low_q, high_q, nonfinite, err_nonpositive,
 *                 err_above_one, duplicate_time, mag_percentile) -> bool
 *
 * The quality flags of astromer.lake.schema.quality_flags for curves already in time order, in one
 * pass per curve: curve i is [offsets[i], offsets[i+1]) of the float64 columns; flags (uint8) gets
 * the given bits: a non-finite value; err <= 0; err > 1; a time equal to the curve's previous one
 * (their difference is zero); a good magnitude (none of those) outside the curve's [low_q, high_q]
 * quantiles of its good magnitudes, interpolated as numpy's percentile does (the ranks from the
 * running buffers or quickselect above). False, with flags partly written, if a curve steps back in
 * time: the numpy twin then sorts it and flags it UNSORTED_SOURCE.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <locale.h>
#ifdef __APPLE__
#include <xlocale.h> /* strtod_l, newlocale */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static const double exact_powers_of_ten[] = {
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

static locale_t c_locale;

/* inlined into the row loop: called from two places it was not, and the parse took 1.3 times as long */
#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* Parse one number starting at p (before end); on success store it, return the first byte after it. */
static ALWAYS_INLINE const char *parse_number(const char *p, const char *end, double *value)
{
    const char *start = p;
    int negative = 0;
    if (p < end && (*p == '-' || *p == '+')) {
        negative = (*p == '-');
        p++;
    }
    uint64_t mantissa = 0;   /* exact while there are at most 19 digits */
    const char *digits = p;
    while (p < end && (unsigned)(*p - '0') < 10) mantissa = mantissa * 10 + (uint64_t)(*p++ - '0');
    Py_ssize_t n_digits = p - digits, frac_digits = 0;
    if (p < end && *p == '.') {
        const char *fraction = ++p;
        while (p < end && (unsigned)(*p - '0') < 10) mantissa = mantissa * 10 + (uint64_t)(*p++ - '0');
        frac_digits = p - fraction;
        n_digits += frac_digits;
    }
    if (n_digits == 0) return NULL;
    Py_ssize_t scale = -frac_digits;     /* the value is mantissa * 10^scale */
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        int exp_negative = 0;
        Py_ssize_t exponent = 0;
        if (p < end && (*p == '-' || *p == '+')) {
            exp_negative = (*p == '-');
            p++;
        }
        const char *exp_digits = p;
        while (p < end && (unsigned)(*p - '0') < 10) {
            if (exponent < 100000) exponent = exponent * 10 + (*p - '0');
            p++;
        }
        if (p == exp_digits) return NULL;
        scale += exp_negative ? -exponent : exponent;
    }
    if (n_digits <= 19 && mantissa <= (UINT64_C(1) << 53) && scale >= -22 && scale <= 22) {
        double m = (double)mantissa;
        double v = scale >= 0 ? m * exact_powers_of_ten[scale] : m / exact_powers_of_ten[-scale];
        *value = negative ? -v : v;
        return p;
    }
    /* a long or far-out decimal (rare): the C library's correctly rounded strtod, "C" locale */
    char token[128];
    size_t length = (size_t)(p - start);
    if (length >= sizeof token) return NULL;
    memcpy(token, start, length);
    token[length] = '\0';
    char *stop = NULL;
    *value = strtod_l(token, &stop, c_locale);
    return stop == token + length ? p : NULL;
}

/* Parse the lines of [p, end) into rows first_row... of out; returns the next row, or -1. */
static Py_ssize_t parse_lines(const char *p, const char *end, double *out, Py_ssize_t ncols, Py_ssize_t rows,
                              Py_ssize_t row, char delimiter)
{
    while (p < end) {
        if (row >= rows) return -1;
        for (Py_ssize_t col = 0; col < ncols; col++) {
            double value;
            p = parse_number(p, end, &value);
            if (!p) return -1;
            out[col * rows + row] = value;
            if (col + 1 < ncols) {
                if (p >= end || *p != delimiter) return -1;
                p++;
            }
        }
        if (p < end) {
            if (*p == '\r') p++;
            if (p >= end || *p != '\n') return -1;
            p++;
        }
        row++;
    }
    return row;
}

/* out's shape from its length, or -1 (with the error set) */
static Py_ssize_t rows_of(Py_buffer *out, Py_ssize_t ncols, int delimiter)
{
    if (ncols <= 0 || delimiter > 127 || delimiter == '\n' || delimiter == '\r'
        || out->len % ((Py_ssize_t)sizeof(double) * ncols) || !PyBuffer_IsContiguous(out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "out must be a C-contiguous float64 buffer of ncols * rows items");
        return -1;
    }
    return out->len / (Py_ssize_t)sizeof(double) / ncols;
}

/* the spans data[starts[k]:ends[k]] one after the other, as if joined (each span's last line may
 * lack its newline), without joining them */
static PyObject *parse_spans(PyObject *self, PyObject *args)
{
    Py_buffer data, starts, ends, out;
    int delimiter;
    Py_ssize_t ncols;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nC", &data, &starts, &ends, &out, &ncols, &delimiter)) return NULL;
    int ok = 0;
    Py_ssize_t rows = rows_of(&out, ncols, delimiter);
    if (rows >= 0 && (starts.len % 8 || ends.len != starts.len)) {
        PyErr_SetString(PyExc_ValueError, "parse_spans: starts and ends must be int64 buffers of one length");
    } else if (rows >= 0) {
        const char *buf = (const char *)data.buf;
        const int64_t *a = (const int64_t *)starts.buf, *b = (const int64_t *)ends.buf;
        Py_ssize_t n = starts.len / 8;
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t row = 0;
        for (Py_ssize_t k = 0; k < n && row >= 0; k++) {
            if (a[k] < 0 || b[k] < a[k] || b[k] > data.len) row = -1;
            else row = parse_lines(buf + a[k], buf + b[k], (double *)out.buf, ncols, rows, row, (char)delimiter);
        }
        ok = rows > 0 && row == rows;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&ends);
    PyBuffer_Release(&out);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(ok);
}

/* how many '\n' bytes [p, stop) holds. A body's lines are short (about 26 bytes in MACHO files), so a
 * memchr per line costs its call more than its scan; sixteen bytes at a time, the count runs at the
 * memory's speed (an archive's 7 MB: 1.6 against 3.4 ms). */
static int64_t count_newlines(const char *p, const char *stop)
{
    int64_t lines = 0;
#if defined(__SSE2__)
    const __m128i newline = _mm_set1_epi8('\n');
    while (stop - p >= 16) {
        __m128i counts = _mm_setzero_si128();          /* sixteen byte-wide counters, at most 255 each */
        for (int blocks = 0; blocks < 255 && stop - p >= 16; blocks++, p += 16)
            counts = _mm_sub_epi8(counts, _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)p), newline));
        __m128i sums = _mm_sad_epu8(counts, _mm_setzero_si128());   /* two 64-bit sums of eight counters */
        lines += _mm_cvtsi128_si64(sums) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(sums, sums));
    }
#endif
    for (; p < stop; p++) lines += (*p == '\n');
    return lines;
}

static PyObject *line_fields(PyObject *self, PyObject *args)
{
    Py_buffer data, starts, ends, columns, out;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*", &data, &starts, &ends, &columns, &out)) return NULL;
    Py_buffer *all[] = {&data, &starts, &ends, &columns, &out};
    Py_ssize_t lines = starts.len / 8, wanted = columns.len / 8, fields_per_line = -1;
    if (starts.len % 8 || ends.len != starts.len || columns.len % 8 || out.len != 8 * lines * wanted) {
        PyErr_SetString(PyExc_ValueError, "line_fields: buffer sizes do not match");
    } else {
        const char *buf = data.buf;
        const int64_t *a = starts.buf, *b = ends.buf, *column = columns.buf;
        double *values = out.buf;
        int64_t highest = -1;
        for (Py_ssize_t j = 0; j < wanted; j++) if (column[j] > highest) highest = column[j];
        Py_BEGIN_ALLOW_THREADS
        int ok = lines > 0;
        for (Py_ssize_t k = 0; k < lines && ok; k++) {
            if (a[k] < 0 || b[k] <= a[k] || b[k] > data.len) { ok = 0; break; }
            const char *p = buf + a[k], *end = buf + b[k];
            Py_ssize_t field = 0;
            while (ok) {                                   /* one field [p, stop) per turn */
                const char *stop = p;
                while (stop < end && *stop != ' ') {
                    unsigned char c = (unsigned char)*stop;
                    if (c < 0x21 || c > 0x7e || c == '"') { ok = 0; break; }
                    stop++;
                }
                if (!ok || stop == p) { ok = 0; break; }   /* a bad byte, or an empty field */
                for (Py_ssize_t j = 0; j < wanted; j++) {
                    if (column[j] != field) continue;
                    double value;
                    if (parse_number(p, stop, &value) != stop) { ok = 0; break; }
                    values[j * lines + k] = value;
                }
                field++;
                if (stop == end) break;
                p = stop + 1;                              /* past the single space */
                if (p == end) ok = 0;                      /* a trailing space */
            }
            if (!ok) break;
            if (fields_per_line < 0) fields_per_line = field;
            if (field != fields_per_line || field <= highest) ok = 0;
        }
        if (!ok) fields_per_line = -1;
        Py_END_ALLOW_THREADS
    }
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) PyBuffer_Release(all[k]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromSsize_t(fields_per_line);
}

static PyObject *scan_members(PyObject *self, PyObject *args)
{
    Py_buffer data, starts, sizes, body_starts, rows, missing, header_counts, header_starts, header_ends;
    int comment;
    if (!PyArg_ParseTuple(args, "y*y*y*Cw*w*w*w*w*w*", &data, &starts, &sizes, &comment, &body_starts, &rows,
                          &missing, &header_counts, &header_starts, &header_ends))
        return NULL;
    Py_buffer *all[] = {&data, &starts, &sizes, &body_starts, &rows, &missing, &header_counts, &header_starts,
                        &header_ends};
    Py_ssize_t n = starts.len / 8;
    int ok = 0;
    if (comment > 255 || starts.len % 8 || sizes.len != starts.len || body_starts.len != starts.len
        || rows.len != starts.len || missing.len != n || header_counts.len != starts.len || n == 0
        || header_starts.len != header_ends.len || header_starts.len % starts.len) {
        PyErr_SetString(PyExc_ValueError, "scan_members: buffer sizes do not match");
    } else {
        const char *buf = (const char *)data.buf;
        const int64_t *start_of = (const int64_t *)starts.buf, *size_of = (const int64_t *)sizes.buf;
        int64_t *body = (int64_t *)body_starts.buf, *row_count = (int64_t *)rows.buf;
        int64_t *counts = (int64_t *)header_counts.buf;
        int64_t *h_start = (int64_t *)header_starts.buf, *h_end = (int64_t *)header_ends.buf;
        uint8_t *no_newline = (uint8_t *)missing.buf;
        Py_ssize_t max_lines = header_starts.len / starts.len;
        Py_BEGIN_ALLOW_THREADS
        ok = 1;
        for (Py_ssize_t i = 0; i < n && ok; i++) {
            int64_t pos = start_of[i], end = start_of[i] + size_of[i];
            if (pos < 0 || size_of[i] < 0 || end > data.len) { ok = 0; break; }
            int64_t count = 0;
            while (pos < end && buf[pos] == (char)comment) {
                if (count == max_lines) { ok = 0; break; }
                const char *newline = memchr(buf + pos, '\n', (size_t)(end - pos));
                int64_t line_end = newline ? (int64_t)(newline - buf) : end;
                h_start[i * max_lines + count] = pos;
                h_end[i * max_lines + count] = line_end;
                count++;
                pos = line_end + 1 < end ? line_end + 1 : end;
            }
            counts[i] = count;
            body[i] = pos;
            no_newline[i] = end > pos && buf[end - 1] != '\n';
            row_count[i] = count_newlines(buf + pos, buf + end) + no_newline[i];
        }
        Py_END_ALLOW_THREADS
    }
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) PyBuffer_Release(all[k]);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(ok);
}

static inline void swap_doubles(double *a, Py_ssize_t i, Py_ssize_t j)
{
    double t = a[i];
    a[i] = a[j];
    a[j] = t;
}

/* the k-th smallest of a[0..n) (a is reordered); Hoare partitions around a median of three */
static double select_kth(double *a, Py_ssize_t n, Py_ssize_t k)
{
    Py_ssize_t lo = 0, hi = n - 1;
    while (hi > lo) {
        if (hi - lo < 16) {
            for (Py_ssize_t i = lo + 1; i <= hi; i++) {
                double v = a[i];
                Py_ssize_t j = i - 1;
                while (j >= lo && a[j] > v) {
                    a[j + 1] = a[j];
                    j--;
                }
                a[j + 1] = v;
            }
            return a[k];
        }
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (a[mid] < a[lo]) swap_doubles(a, mid, lo);
        if (a[hi] < a[lo]) swap_doubles(a, hi, lo);
        if (a[hi] < a[mid]) swap_doubles(a, hi, mid);
        double pivot = a[mid];
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                swap_doubles(a, i, j);
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

/* ranks this close to either end of a curve are read from a running buffer of its smallest or
 * largest values (one pass, predictable branches); the others go through select_kth */
#define EDGE_RANKS 16

/* keep buf[0..*count) as the (at most ``size``) values that come first in ascending (ascending=1) or
 * descending order among those offered so far */
static inline void offer(double *buf, Py_ssize_t *count, Py_ssize_t size, double v, int ascending)
{
    Py_ssize_t n = *count;
    if (n == size) {
        if (ascending ? !(v < buf[n - 1]) : !(v > buf[n - 1])) return;
        n--;
    }
    Py_ssize_t j = n - 1;
    while (j >= 0 && (ascending ? buf[j] > v : buf[j] < v)) {
        buf[j + 1] = buf[j];
        j--;
    }
    buf[j + 1] = v;
    *count = n + 1;
}

/* the values of ranks[0..m) in the ascending order of values[0..n) into out (NaN for a rank outside
 * [0, n)); ranks near either end from running buffers, the others by quickselect on scratch (a copy of
 * the values, or the values themselves when scratch is them: then they are reordered). Returns 0 if a
 * value is NaN, whose place in an order is not defined. */
static int values_of_ranks(const double *values, Py_ssize_t n, const int64_t *ranks, Py_ssize_t m, double *out,
                           double *scratch)
{
    double low[EDGE_RANKS], high[EDGE_RANKS];
    Py_ssize_t n_low = 0, n_high = 0, want_low = 0, want_high = 0;
    int middle = 0;
    for (Py_ssize_t j = 0; j < m; j++) {
        int64_t r = ranks[j];
        if (r < 0 || r >= n) continue;
        if (r < EDGE_RANKS) { if (r + 1 > want_low) want_low = r + 1; }
        else if (n - 1 - r < EDGE_RANKS) { if (n - r > want_high) want_high = n - r; }
        else middle = 1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        double x = values[k];
        if (x != x) return 0;
        if (want_low) offer(low, &n_low, want_low, x, 1);
        if (want_high) offer(high, &n_high, want_high, x, 0);
    }
    if (middle && scratch != values) memcpy(scratch, values, sizeof(double) * (size_t)n);
    for (Py_ssize_t j = 0; j < m; j++) {
        int64_t r = ranks[j];
        double value = NAN;
        if (r >= 0 && r < n) {
            if (r < EDGE_RANKS) value = low[r];
            else if (n - 1 - r < EDGE_RANKS) value = high[n - 1 - r];
            else value = select_kth(scratch, n, r);
        }
        out[j] = value;
    }
    return 1;
}

static PyObject *select_ranks(PyObject *self, PyObject *args)
{
    Py_buffer values, starts, lengths, ranks, out;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*", &values, &starts, &lengths, &ranks, &out)) return NULL;
    Py_buffer *all[] = {&values, &starts, &lengths, &ranks, &out};
    Py_ssize_t n_curves = starts.len / 8, n_values = values.len / 8;
    int ok = 0;
    if (values.len % 8 || starts.len % 8 || lengths.len != starts.len || ranks.len != out.len || ranks.len % 8
        || n_curves == 0 || (ranks.len / 8) % n_curves) {
        PyErr_SetString(PyExc_ValueError, "select_ranks: buffer sizes do not match");
    } else {
        const double *v = (const double *)values.buf;
        const int64_t *start_of = (const int64_t *)starts.buf, *length_of = (const int64_t *)lengths.buf;
        const int64_t *rank = (const int64_t *)ranks.buf;
        double *result = (double *)out.buf;
        Py_ssize_t m = ranks.len / 8 / n_curves, longest = 0;
        ok = 1;
        for (Py_ssize_t i = 0; i < n_curves; i++) {
            if (start_of[i] < 0 || length_of[i] < 0 || start_of[i] + length_of[i] > n_values) ok = 0;
            else if (length_of[i] > longest) longest = length_of[i];
        }
        double *scratch = ok ? malloc(sizeof(double) * (size_t)(longest > 0 ? longest : 1)) : NULL;
        if (ok && !scratch) {
            PyErr_NoMemory();
            ok = 0;
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n_curves && ok; i++)
            ok = values_of_ranks(v + start_of[i], length_of[i], rank + i * m, m, result + i * m, scratch);
        Py_END_ALLOW_THREADS
        free(scratch);
    }
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) PyBuffer_Release(all[k]);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(ok);
}

/* numpy's linear interpolation of the q quantile of n values: ranks lo and hi, and the fraction between */
static inline void percentile_ranks(Py_ssize_t n, double q, int64_t *lo, int64_t *hi, double *fraction)
{
    Py_ssize_t count = n > 1 ? n : 1;
    double position = (double)(count - 1) * q;
    double floor_position = floor(position);
    *lo = (int64_t)floor_position;
    *hi = *lo + 1 < count - 1 ? *lo + 1 : count - 1;
    *fraction = position - floor_position;
}

static PyObject *flag_curves(PyObject *self, PyObject *args)
{
    Py_buffer mjd_b, mag_b, err_b, offsets_b, flags_b;
    double low_q, high_q;
    int bit_nonfinite, bit_err_nonpositive, bit_err_above_one, bit_duplicate, bit_outside;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*ddiiiii", &mjd_b, &mag_b, &err_b, &offsets_b, &flags_b, &low_q,
                          &high_q, &bit_nonfinite, &bit_err_nonpositive, &bit_err_above_one, &bit_duplicate,
                          &bit_outside)) return NULL;
    Py_buffer *all[] = {&mjd_b, &mag_b, &err_b, &offsets_b, &flags_b};
    Py_ssize_t n = mjd_b.len / 8, n_curves = offsets_b.len / 8 - 1;
    int ok = 0;
    if (mjd_b.len % 8 || mag_b.len != mjd_b.len || err_b.len != mjd_b.len || flags_b.len != n
        || offsets_b.len % 8 || n_curves < 0) {
        PyErr_SetString(PyExc_ValueError, "flag_curves: buffer sizes do not match");
    } else {
        const double *mjd = mjd_b.buf, *mag = mag_b.buf, *err = err_b.buf;
        const int64_t *offsets = offsets_b.buf;
        uint8_t *flags = flags_b.buf;
        const uint8_t cleaning = (uint8_t)(bit_nonfinite | bit_err_nonpositive | bit_err_above_one | bit_duplicate);
        Py_ssize_t longest = 0;
        ok = n_curves == 0 ? n == 0 : offsets[0] == 0 && offsets[n_curves] == n;
        for (Py_ssize_t i = 0; i < n_curves && ok; i++) {
            if (offsets[i + 1] < offsets[i]) ok = 0;
            else if (offsets[i + 1] - offsets[i] > longest) longest = offsets[i + 1] - offsets[i];
        }
        double *good = ok ? malloc(sizeof(double) * (size_t)(longest > 0 ? longest : 1)) : NULL;
        if (ok && !good) {
            PyErr_NoMemory();
            ok = 0;
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t c = 0; c < n_curves && ok; c++) {
            Py_ssize_t lo = offsets[c], hi = offsets[c + 1], n_good = 0;
            int usable_at_time = 0;       /* a row of the current time had a usable value already */
            for (Py_ssize_t i = lo; i < hi; i++) {
                uint8_t f = 0;
                /* magnitudes and errors as the lake stores them (float32) */
                double m = (double)(float)mag[i], e = (double)(float)err[i];
                if (!isfinite(mjd[i]) || !isfinite(m) || !isfinite(e)) f |= bit_nonfinite;
                if (e <= 0) f |= bit_err_nonpositive;
                if (e > 1) f |= bit_err_above_one;
                if (i > lo) {
                    double step = mjd[i] - mjd[i - 1];
                    if (step < 0) { ok = 0; break; }
                    if (step != 0) usable_at_time = 0;
                    else if (usable_at_time) f |= bit_duplicate;
                }
                if (!f) usable_at_time = 1;
                flags[i] = f;
                if (!(f & cleaning)) good[n_good++] = m;
            }
            if (!ok || n_good == 0) continue;        /* no good magnitude: nothing is outside */
            int64_t rank[4];
            double fraction[2], bound[2];
            percentile_ranks(n_good, low_q, &rank[0], &rank[1], &fraction[0]);
            percentile_ranks(n_good, high_q, &rank[2], &rank[3], &fraction[1]);
            double value[4];
            values_of_ranks(good, n_good, rank, 4, value, good);     /* good magnitudes are finite */
            bound[0] = value[0] + (value[1] - value[0]) * fraction[0];
            bound[1] = value[2] + (value[3] - value[2]) * fraction[1];
            for (Py_ssize_t i = lo; i < hi; i++) {
                double m = (double)(float)mag[i];
                if (!(flags[i] & cleaning) && (m < bound[0] || m > bound[1])) flags[i] |= bit_outside;
            }
        }
        Py_END_ALLOW_THREADS
        free(good);
    }
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) PyBuffer_Release(all[k]);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(ok);
}

static PyObject *tar_headers(PyObject *self, PyObject *args)
{
    Py_buffer data, heads_b, sizes_b, types_b;
    if (!PyArg_ParseTuple(args, "y*w*w*w*", &data, &heads_b, &sizes_b, &types_b)) return NULL;
    Py_buffer *all[] = {&data, &heads_b, &sizes_b, &types_b};
    Py_ssize_t count = -1;
    if (heads_b.len % 8 || sizes_b.len != heads_b.len || types_b.len != heads_b.len) {
        PyErr_SetString(PyExc_ValueError, "tar_headers: header_blocks, sizes and typeflags must be int64 of one length");
    } else {
        const unsigned char *d = data.buf;
        int64_t *heads = heads_b.buf, *sizes = sizes_b.buf, *types = types_b.buf;
        Py_ssize_t capacity = heads_b.len / 8, n_blocks = data.len / 512, block = 0, n = 0;
        int ok = n_blocks > 0;
        Py_BEGIN_ALLOW_THREADS
        while (ok && block < n_blocks) {
            const unsigned char *h = d + block * 512;
            unsigned sum = 0;
            for (int k = 0; k < 512; k++) sum += h[k];
            if (sum == 0) break;                  /* the end: only zero bytes may follow (below) */
            if (memcmp(h + 257, "ustar", 5) != 0 || n == capacity) { ok = 0; break; }
            int64_t size = 0, check = 0;
            for (int k = 124; k < 135 && ok; k++) {
                if (h[k] < '0' || h[k] > '7') ok = 0;
                else size = size * 8 + (h[k] - '0');
            }
            for (int k = 148; k < 154 && ok; k++) {
                if (h[k] < '0' || h[k] > '7') ok = 0;
                else check = check * 8 + (h[k] - '0');
            }
            if (!ok || (h[135] != 0 && h[135] != ' ')) { ok = 0; break; }
            unsigned field = 0;                     /* the checksum counts its own field as eight spaces */
            for (int k = 148; k < 156; k++) field += h[k];
            unsigned char type = h[156];
            if ((int64_t)(sum - field + 8 * 32) != check || type == 'L' || type == 'K' || type == 'x' || type == 'g'
                || (block + 1) * 512 + size > data.len) { ok = 0; break; }
            heads[n] = block;
            sizes[n] = size;
            types[n] = type;
            n++;
            block += 1 + (size + 511) / 512;
        }
        if (ok && block * 512 > data.len) ok = 0;       /* the last member's padding is cut off */
        for (Py_ssize_t k = block * 512; k < data.len && ok; k++) ok = d[k] == 0;
        Py_END_ALLOW_THREADS
        count = ok && n > 0 ? n : -1;
    }
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) PyBuffer_Release(all[k]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromSsize_t(count);
}

static PyMethodDef methods[] = {
    {"tar_headers", tar_headers, METH_VARARGS,
     "tar_headers(data, header_blocks, sizes, typeflags) -> int: walk the ustar headers of an uncompressed "
     "tar in memory; how many, or -1 where they are not all regular (see the module source)."},
    {"flag_curves", flag_curves, METH_VARARGS,
     "flag_curves(mjd, mag, err, offsets, flags, low_q, high_q, nonfinite, err_nonpositive, err_above_one, "
     "duplicate_time, mag_percentile) -> bool: the quality flags of curves in time order (see the module "
     "source); False where a curve steps back in time."},
    {"select_ranks", select_ranks, METH_VARARGS,
     "select_ranks(values, starts, lengths, ranks, out) -> bool: per curve, the values of the given ranks "
     "in its ascending order (see the module source)."},
    {"parse_spans", parse_spans, METH_VARARGS,
     "parse_spans(data, starts, ends, out, ncols, delimiter) -> bool: fill out (float64, ncols x rows, column "
     "by column) from the strictly regular numeric rows of the spans of data, read one after the other; "
     "False where they are not (see the module source)."},
    {"line_fields", line_fields, METH_VARARGS,
     "line_fields(data, starts, ends, columns, out) -> int: the numbers in the wanted fields of strictly "
     "regular single-space separated lines; how many fields each line holds, or -1 (see the module source)."},
    {"scan_members", scan_members, METH_VARARGS,
     "scan_members(data, starts, sizes, comment, body_starts, rows, missing, header_counts, header_starts, "
     "header_ends) -> bool: find every member's comment header lines and count its body lines (see the "
     "module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void)
{
    c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (!c_locale) return PyErr_NoMemory();
    return PyModule_Create(&module);
}
