/* The engine's compiled kernel: the KV block pool's hot operations and the synthetic
 * token draws, bit-identical to their pure-Python reference (kv.BlockPool,
 * kv.extend_block_hashes, tokens.TokenSource._draw); tests/server/test_kernel.py checks
 * it on randomised workloads. Python wrapper and fallback: server/engine/kernel.py.
 *
 * Block hashes are CPython's own hash((parent, tuple_of_16_ids)), recomputed here: the
 * tuple hash is xxHash-style lanes over the items' hashes (Objects/tupleobject.c), an
 * int's hash is its value modulo 2**61 - 1 with its sign (-1 becoming -2). So a block
 * keeps the name the reference gives it and KV events carry the same values.
 *
 * Token ids never become Python ints here: a sequence's output ids are an array('q')
 * (read through the buffer protocol), the draws write into one, and a prompt's small
 * ints are read in place (the only Python objects a prompt holds).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ---- CPython's hashes, for 64-bit Py_hash_t ---- */

#define XXPRIME_1 ((uint64_t)11400714785074694791ULL)
#define XXPRIME_2 ((uint64_t)14029467366897019727ULL)
#define XXPRIME_5 ((uint64_t)2870177450012600261ULL)
#define XXROTATE(x) (((x) << 31) | ((x) >> 33))
#define HASH_MODULUS (((uint64_t)1 << 61) - 1)

static inline uint64_t tuple_lane(uint64_t acc, uint64_t lane)
{
    acc += lane * XXPRIME_2;
    acc = XXROTATE(acc);
    return acc * XXPRIME_1;
}

static inline int64_t tuple_finish(uint64_t acc, uint64_t len)
{
    acc += len ^ (XXPRIME_5 ^ 3527539UL);
    if (acc == (uint64_t)-1)
        return 1546275796;
    return (int64_t)acc;
}

/* hash(int(v)) for a signed 64-bit v. */
static inline int64_t int_hash(int64_t v)
{
    int64_t h;
    if (v >= 0) {
        h = (int64_t)((uint64_t)v % HASH_MODULUS);
    } else {
        h = -(int64_t)((-(uint64_t)v) % HASH_MODULUS);
    }
    return h == -1 ? -2 : h;
}

/* hash(o) for a prompt token: an exact int of at most two digits (below 2**60, so its own
 * hash) read in place, where PyObject_Hash would make a call and a division per token;
 * anything else through PyObject_Hash. -1 with an exception set on failure. */
static inline Py_hash_t token_hash(PyObject *o)
{
    if (PyLong_CheckExact(o)) {
#if PY_VERSION_HEX >= 0x030C0000
        PyLongObject *v = (PyLongObject *)o;
        if (PyUnstable_Long_IsCompact(v)) {
            Py_ssize_t x = PyUnstable_Long_CompactValue(v);
            return x == -1 ? -2 : (Py_hash_t)x;
        }
#else
        const digit *d = ((PyLongObject *)o)->ob_digit;
        switch (Py_SIZE(o)) {
        case 0:
            return 0;
        case 1:
            return (Py_hash_t)d[0];
        case -1:
            return d[0] == 1 ? -2 : -(Py_hash_t)d[0];
        case 2:
            return (Py_hash_t)d[0] | ((Py_hash_t)d[1] << PyLong_SHIFT);
        case -2:
            return -((Py_hash_t)d[0] | ((Py_hash_t)d[1] << PyLong_SHIFT));
        }
#endif
    }
    return PyObject_Hash(o);
}

/* hash(t) for a tuple whose items are read as token_hash reads them. */
static Py_hash_t flat_tuple_hash(PyObject *t)
{
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    uint64_t acc = XXPRIME_5;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_hash_t h = token_hash(PyTuple_GET_ITEM(t, i));
        if (h == -1)
            return -1;
        acc = tuple_lane(acc, (uint64_t)h);
    }
    return (Py_hash_t)tuple_finish(acc, (uint64_t)n);
}

/* A read-only view of signed 64-bit values (a sequence's output ids, its block hashes): an
 * array('q') or any C-contiguous buffer of 8-byte signed items, read in place, or a list or
 * tuple of ints. */
typedef struct {
    int is_buffer;
    PyObject **items; /* a list's or tuple's items (NULL when empty) */
    Py_buffer view;
    const int64_t *at;
    Py_ssize_t len;
} Ids;

static int ids_open(Ids *ids, PyObject *o, const char *what)
{
    if (PyList_Check(o) || PyTuple_Check(o)) {
        ids->is_buffer = 0;
        ids->items = PySequence_Fast_ITEMS(o);
        ids->at = NULL;
        ids->len = PySequence_Fast_GET_SIZE(o);
        return 0;
    }
    ids->is_buffer = 1;
    ids->items = NULL;
    if (PyObject_GetBuffer(o, &ids->view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    const char *f = ids->view.format ? ids->view.format : "B";
    if (f[0] == '@' || f[0] == '=' || f[0] == '<')
        f++;
    if (ids->view.itemsize != 8 || (strcmp(f, "q") != 0 && strcmp(f, "l") != 0)) {
        PyBuffer_Release(&ids->view);
        PyErr_Format(PyExc_TypeError, "%s: an array('q') or a list of ints", what);
        return -1;
    }
    ids->at = ids->view.buf;
    ids->len = ids->view.len / 8;
    return 0;
}

static void ids_close(Ids *ids)
{
    if (ids->is_buffer)
        PyBuffer_Release(&ids->view);
}

/* hash(int(id)) for output id `i`: -1 with an exception set on failure. */
static inline Py_hash_t ids_hash(const Ids *ids, Py_ssize_t i)
{
    if (!ids->is_buffer)
        return token_hash(ids->items[i]);
    return (Py_hash_t)int_hash(ids->at[i]);
}

/* Value `i` as a signed 64-bit int: -1 with an exception set on failure. */
static inline int ids_get(const Ids *ids, Py_ssize_t i, int64_t *out)
{
    if (ids->is_buffer) {
        *out = ids->at[i];
        return 0;
    }
    *out = PyLong_AsLongLong(ids->items[i]);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* ---- a growable int32 stack ---- */

typedef struct {
    int32_t *at;
    Py_ssize_t len, cap;
} Stack;

static int stack_push(Stack *s, int32_t v)
{
    if (s->len == s->cap) {
        Py_ssize_t cap = s->cap ? s->cap * 2 : 64;
        int32_t *at = PyMem_Realloc(s->at, cap * sizeof(int32_t));
        if (!at) {
            PyErr_NoMemory();
            return -1;
        }
        s->at = at;
        s->cap = cap;
    }
    s->at[s->len++] = v;
    return 0;
}

/* ---- the pool ---- */

#define NONE (-1)
#define NOT_IN_LRU (-2)

typedef struct {
    int64_t key; /* a block hash */
    int32_t val; /* its block; NONE: an empty slot */
} Slot;

typedef struct {
    PyObject_HEAD
    Py_ssize_t total_blocks, block_size, free_blocks;
    /* By block id, for the ids handed out so far (`created`); grown by doubling. */
    Py_ssize_t created, cap;
    int32_t *refs;
    int64_t *hashes;
    uint8_t *has_hash;
    int32_t *prev, *next; /* the LRU's links; prev == NOT_IN_LRU: not in it */
    int32_t lru_head, lru_tail;
    Py_ssize_t lru_len;
    Stack empty; /* free blocks holding nothing, reused last-in first-out */
    /* block hash -> block id: open addressing, linear probing, backward-shift deletion */
    Slot *slots; /* key and value side by side: a probe touches one cache line, not two */
    size_t mask;
    Py_ssize_t n_cached;
    int64_t root; /* the parent hash of a sequence's first block */
} Pool;

static int grow_ids(Pool *p, Py_ssize_t need)
{
    if (need <= p->cap)
        return 0;
    Py_ssize_t cap = p->cap ? p->cap : 256;
    while (cap < need)
        cap *= 2;
    if (cap > p->total_blocks)
        cap = p->total_blocks;
    int32_t *refs = PyMem_Realloc(p->refs, cap * sizeof(int32_t));
    if (!refs)
        goto fail;
    p->refs = refs;
    int64_t *hashes = PyMem_Realloc(p->hashes, cap * sizeof(int64_t));
    if (!hashes)
        goto fail;
    p->hashes = hashes;
    uint8_t *has = PyMem_Realloc(p->has_hash, cap);
    if (!has)
        goto fail;
    p->has_hash = has;
    int32_t *prev = PyMem_Realloc(p->prev, cap * sizeof(int32_t));
    if (!prev)
        goto fail;
    p->prev = prev;
    int32_t *next = PyMem_Realloc(p->next, cap * sizeof(int32_t));
    if (!next)
        goto fail;
    p->next = next;
    p->cap = cap;
    return 0;
fail:
    PyErr_NoMemory();
    return -1;
}

/* map */

static inline size_t slot_of(int64_t key, size_t mask)
{
    uint64_t x = (uint64_t)key;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x & mask;
}

static int map_resize(Pool *p, size_t n)
{
    Slot *slots = PyMem_Malloc(n * sizeof(Slot));
    if (!slots) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        slots[i].val = NONE;
    size_t mask = n - 1;
    if (p->slots) {
        for (size_t i = 0; i <= p->mask; i++) {
            if (p->slots[i].val == NONE)
                continue;
            size_t j = slot_of(p->slots[i].key, mask);
            while (slots[j].val != NONE)
                j = (j + 1) & mask;
            slots[j] = p->slots[i];
        }
    }
    PyMem_Free(p->slots);
    p->slots = slots;
    p->mask = mask;
    return 0;
}

static inline int32_t map_get(const Pool *p, int64_t key)
{
    size_t j = slot_of(key, p->mask);
    for (;;) {
        const Slot *s = &p->slots[j];
        if (s->val == NONE || s->key == key)
            return s->val;
        j = (j + 1) & p->mask;
    }
}

static int map_put(Pool *p, int64_t key, int32_t block)
{
    if ((size_t)(p->n_cached + 1) * 2 > p->mask + 1 && map_resize(p, (p->mask + 1) * 2) < 0)
        return -1;
    size_t j = slot_of(key, p->mask);
    while (p->slots[j].val != NONE)
        j = (j + 1) & p->mask;
    p->slots[j].key = key;
    p->slots[j].val = block;
    p->n_cached++;
    return 0;
}

static void map_del(Pool *p, int64_t key)
{
    size_t mask = p->mask;
    Slot *slots = p->slots;
    size_t j = slot_of(key, mask);
    while (slots[j].key != key || slots[j].val == NONE)
        j = (j + 1) & mask; /* the key is there: callers delete only cached hashes */
    /* Backward shift: move later entries of the probe run into the hole. */
    size_t hole = j;
    for (;;) {
        j = (j + 1) & mask;
        if (slots[j].val == NONE)
            break;
        size_t home = slot_of(slots[j].key, mask);
        /* Move it unless its home lies cyclically in (hole, j]. */
        if ((j > hole && (home <= hole || home > j)) || (j < hole && home <= hole && home > j)) {
            slots[hole] = slots[j];
            hole = j;
        }
    }
    slots[hole].val = NONE;
    p->n_cached--;
}

static void map_clear(Pool *p)
{
    for (size_t i = 0; i <= p->mask; i++)
        p->slots[i].val = NONE;
    p->n_cached = 0;
}

/* LRU */

static inline void lru_append(Pool *p, int32_t b)
{
    p->prev[b] = p->lru_tail;
    p->next[b] = NONE;
    if (p->lru_tail == NONE)
        p->lru_head = b;
    else
        p->next[p->lru_tail] = b;
    p->lru_tail = b;
    p->lru_len++;
}

static inline void lru_remove(Pool *p, int32_t b)
{
    int32_t prev = p->prev[b], next = p->next[b];
    if (prev == NONE)
        p->lru_head = next;
    else
        p->next[prev] = next;
    if (next == NONE)
        p->lru_tail = prev;
    else
        p->prev[next] = prev;
    p->prev[b] = NOT_IN_LRU;
    p->lru_len--;
}

/* helpers */

/* A block id from a Python int, checked against the ids handed out. */
static int block_of(Pool *p, PyObject *item, int32_t *out)
{
    Py_ssize_t b = PyLong_AsSsize_t(item);
    if (b == -1 && PyErr_Occurred())
        return -1;
    if (b < 0 || b >= p->created) {
        PyErr_Format(PyExc_IndexError, "KV block %zd was never handed out", b);
        return -1;
    }
    *out = (int32_t)b;
    return 0;
}

/* Block id `i` of a view (an array('q') of block ids, or a list), checked likewise. */
static inline int block_at(Pool *p, const Ids *ids, Py_ssize_t i, int32_t *out)
{
    if (!ids->is_buffer)
        return block_of(p, ids->items[i], out);
    int64_t b = ids->at[i];
    if (b < 0 || b >= p->created) {
        PyErr_Format(PyExc_IndexError, "KV block %lld was never handed out", (long long)b);
        return -1;
    }
    *out = (int32_t)b;
    return 0;
}

/* A new array('q') of `n` ids (zeros), and where its items are: the engine's block tables
 * are machine integers, as its token ids (array's repeat is a memcpy, not a call). */
static PyObject *one_id; /* array('q', [0]), made at import */

static PyObject *new_ids(Py_ssize_t n, int64_t **at)
{
    PyObject *arr = PySequence_Repeat(one_id, n);
    if (!arr)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arr, &view, PyBUF_WRITABLE) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    *at = view.buf; /* valid while the array is not resized: it is not, until returned */
    PyBuffer_Release(&view);
    return arr;
}

/* Python ints for block ids, made once each and shared: a simulation hands out the same
 * few thousand block ids millions of times, and an int
 * made afresh costs an allocation (ints are immutable, so sharing one is invisible). */
static PyObject **int_cache;
static Py_ssize_t int_cache_len;
#define INT_CACHE_MAX ((Py_ssize_t)1 << 20) /* at most 8 MB of pointers, 32 MB of ints */

static PyObject *new_int(Py_ssize_t v)
{
    if (v < 0 || v >= INT_CACHE_MAX)
        return PyLong_FromSsize_t(v);
    if (v >= int_cache_len) {
        Py_ssize_t len = int_cache_len ? int_cache_len : 1024;
        while (len <= v)
            len *= 2;
        PyObject **cache = PyMem_Realloc(int_cache, len * sizeof(PyObject *));
        if (!cache)
            return PyErr_NoMemory();
        memset(cache + int_cache_len, 0, (len - int_cache_len) * sizeof(PyObject *));
        int_cache = cache;
        int_cache_len = len;
    }
    PyObject *o = int_cache[v];
    if (!o) {
        o = PyLong_FromSsize_t(v);
        if (!o)
            return NULL;
        int_cache[v] = o; /* the cache's own reference, for the module's lifetime */
    }
    Py_INCREF(o);
    return o;
}

static int hash_chain(PyObject *hashes, Py_ssize_t full, Py_ssize_t size, int64_t root,
                      PyObject *prompt, PyObject *output);

/* ---- methods ---- */

static int Pool_init(Pool *p, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"total_blocks", "block_size", "root_hash", NULL};
    Py_ssize_t total, size;
    long long root = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nn|L", kwlist, &total, &size, &root))
        return -1;
    p->root = root;
    if (total < 0 || total > INT32_MAX || size < 1) {
        PyErr_SetString(PyExc_ValueError, "total_blocks must be in [0, 2**31) and block_size >= 1");
        return -1;
    }
    p->total_blocks = total;
    p->block_size = size;
    p->free_blocks = total;
    p->lru_head = p->lru_tail = NONE;
    return map_resize(p, 1024);
}

static void Pool_dealloc(Pool *p)
{
    PyMem_Free(p->refs);
    PyMem_Free(p->hashes);
    PyMem_Free(p->has_hash);
    PyMem_Free(p->prev);
    PyMem_Free(p->next);
    PyMem_Free(p->empty.at);
    PyMem_Free(p->slots);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

/* Hand out `n` blocks (the room checked by the caller) into `ids`: empty blocks first,
 * then never-used ids, then the least recently used cached blocks, evicted (each evicted
 * block's hash appended to the list `evicted` when it is not None, for BlockRemoved
 * events). As BlockPool.allocate. */
static int allocate_into(Pool *p, Py_ssize_t n, int64_t *ids, PyObject *evicted)
{
    Py_ssize_t k = 0;
    Py_ssize_t take = n < p->empty.len ? n : p->empty.len;
    Py_ssize_t fresh = n - take;
    if (fresh > p->total_blocks - p->created)
        fresh = p->total_blocks - p->created;
    if (fresh && grow_ids(p, p->created + fresh) < 0)
        return -1; /* before anything is taken */
    for (; k < take; k++) {
        int32_t b = p->empty.at[--p->empty.len];
        p->refs[b] = 1;
        ids[k] = b;
    }
    for (Py_ssize_t i = 0; i < fresh; i++, k++) {
        int32_t b = (int32_t)p->created++;
        p->refs[b] = 1;
        p->has_hash[b] = 0;
        p->prev[b] = NOT_IN_LRU;
        ids[k] = b;
    }
    int rc = 0;
    for (; k < n; k++) { /* evict, least recently used first: the room was checked */
        int32_t b = p->lru_head;
        lru_remove(p, b);
        int64_t h = p->hashes[b];
        p->has_hash[b] = 0;
        map_del(p, h);
        p->refs[b] = 1;
        ids[k] = b;
        if (evicted != Py_None && rc == 0) {
            PyObject *o = PyLong_FromLongLong(h);
            if (!o || PyList_Append(evicted, o) < 0)
                rc = -1; /* the blocks are taken all the same: the state stays whole */
            Py_XDECREF(o);
        }
    }
    p->free_blocks -= n;
    return rc;
}

/* allocate(n, evicted) -> array('q') | None: as BlockPool.allocate. */
static PyObject *do_allocate(Pool *p, Py_ssize_t n, PyObject *evicted)
{
    if (n > p->free_blocks)
        Py_RETURN_NONE;
    if (n < 0)
        n = 0;
    int64_t *at;
    PyObject *ids = new_ids(n, &at);
    if (!ids)
        return NULL;
    if (allocate_into(p, n, at, evicted) < 0) {
        Py_DECREF(ids);
        return NULL;
    }
    return ids;
}

static PyObject *Pool_allocate(Pool *p, PyObject *args)
{
    Py_ssize_t n;
    PyObject *evicted = Py_None;
    if (!PyArg_ParseTuple(args, "n|O", &n, &evicted))
        return NULL;
    return do_allocate(p, n, evicted);
}

/* release(block_ids): as BlockPool.release. */
static PyObject *Pool_release(Pool *p, PyObject *arg)
{
    Ids ids;
    if (ids_open(&ids, arg, "release: block ids") < 0)
        return NULL;
    PyObject *result = NULL;
    for (Py_ssize_t i = ids.len - 1; i >= 0; i--) {
        int32_t b;
        if (block_at(p, &ids, i, &b) < 0)
            goto done;
        int32_t count = --p->refs[b];
        if (count > 0)
            continue;
        if (count < 0) {
            PyErr_Format(PyExc_AssertionError, "KV block %d released more often than referenced",
                         (int)b);
            goto done;
        }
        p->free_blocks++;
        if (p->has_hash[b])
            lru_append(p, b);
        else if (stack_push(&p->empty, b) < 0)
            goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    ids_close(&ids);
    return result;
}

/* lookup(block_hashes, max_blocks) -> list: as BlockPool.lookup. */
static PyObject *Pool_lookup(Pool *p, PyObject *args)
{
    PyObject *arg;
    Py_ssize_t max_blocks;
    if (!PyArg_ParseTuple(args, "On", &arg, &max_blocks))
        return NULL;
    Ids hashes;
    if (ids_open(&hashes, arg, "lookup: block hashes") < 0)
        return NULL;
    Py_ssize_t n = hashes.len;
    if (max_blocks < n)
        n = max_blocks < 0 ? 0 : max_blocks;
    PyObject *hits = PyList_New(0);
    if (!hits)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t h;
        if (ids_get(&hashes, i, &h) < 0) {
            Py_CLEAR(hits);
            goto done;
        }
        int32_t b = map_get(p, h);
        if (b == NONE)
            break;
        PyObject *o = new_int(b);
        if (!o || PyList_Append(hits, o) < 0) {
            Py_XDECREF(o);
            Py_CLEAR(hits);
            goto done;
        }
        Py_DECREF(o);
    }
done:
    ids_close(&hashes);
    return hits;
}

/* How many of `ids` are free (referencing them uses up free blocks); -1 on error. */
static Py_ssize_t free_among(Pool *p, const Ids *ids)
{
    Py_ssize_t free = 0;
    for (Py_ssize_t i = 0; i < ids->len; i++) {
        int32_t b;
        if (block_at(p, ids, i, &b) < 0)
            return -1;
        free += p->refs[b] == 0;
    }
    return free;
}

/* free_among(block_ids) -> int */
static PyObject *Pool_free_among(Pool *p, PyObject *arg)
{
    Ids ids;
    if (ids_open(&ids, arg, "free_among: block ids") < 0)
        return NULL;
    Py_ssize_t free = free_among(p, &ids);
    ids_close(&ids);
    return free < 0 ? NULL : PyLong_FromSsize_t(free);
}

/* One reference on each of `ids` (cache hits); -1 on error. */
static int touch(Pool *p, const Ids *ids)
{
    for (Py_ssize_t i = 0; i < ids->len; i++) {
        int32_t b;
        if (block_at(p, ids, i, &b) < 0)
            return -1;
        if (p->refs[b] == 0) {
            if (p->prev[b] == NOT_IN_LRU) {
                PyErr_Format(PyExc_KeyError, "KV block %d is free but not cached", (int)b);
                return -1;
            }
            lru_remove(p, b);
            p->free_blocks--;
        }
        p->refs[b]++;
    }
    return 0;
}

/* touch(block_ids): one reference on each (cache hits). */
static PyObject *Pool_touch(Pool *p, PyObject *arg)
{
    Ids ids;
    if (ids_open(&ids, arg, "touch: block ids") < 0)
        return NULL;
    int rc = touch(p, &ids);
    ids_close(&ids);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* cache(block_ids, block_hashes, start, end) -> list: as BlockPool.cache, returning the
 * positions it entered (the reference's `stored`, for BlockStored events). */
static PyObject *Pool_cache(Pool *p, PyObject *args)
{
    PyObject *ids_arg, *arg;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "OOnn", &ids_arg, &arg, &start, &end))
        return NULL;
    Ids ids, hashes;
    if (ids_open(&ids, ids_arg, "cache: block ids") < 0)
        return NULL;
    if (ids_open(&hashes, arg, "cache: block hashes") < 0) {
        ids_close(&ids);
        return NULL;
    }
    PyObject *stored = NULL;
    if (start < end && (start < 0 || end > ids.len || end > hashes.len)) {
        PyErr_SetString(PyExc_IndexError, "cache: blocks out of range");
        goto done;
    }
    stored = PyList_New(0);
    if (!stored)
        goto done;
    for (Py_ssize_t i = start; i < end; i++) {
        int32_t b;
        if (block_at(p, &ids, i, &b) < 0)
            goto fail;
        if (p->has_hash[b])
            continue;
        int64_t h;
        if (ids_get(&hashes, i, &h) < 0)
            goto fail;
        if (map_get(p, h) != NONE)
            continue;
        if (map_put(p, h, b) < 0)
            goto fail;
        p->hashes[b] = h;
        p->has_hash[b] = 1;
        PyObject *o = PyLong_FromSsize_t(i);
        if (!o || PyList_Append(stored, o) < 0) {
            Py_XDECREF(o);
            goto fail;
        }
        Py_DECREF(o);
    }
    goto done;
fail:
    Py_CLEAR(stored);
done:
    ids_close(&hashes);
    ids_close(&ids);
    return stored;
}

/* any_cached(block_hashes) -> bool: whether any of them names a cached block. */
static PyObject *Pool_any_cached(Pool *p, PyObject *arg)
{
    Ids hashes;
    if (ids_open(&hashes, arg, "any_cached: block hashes") < 0)
        return NULL;
    PyObject *found = Py_False;
    for (Py_ssize_t i = 0; i < hashes.len; i++) {
        int64_t h;
        if (ids_get(&hashes, i, &h) < 0) {
            found = NULL;
            break;
        }
        if (map_get(p, h) != NONE) {
            found = Py_True;
            break;
        }
    }
    ids_close(&hashes);
    Py_XINCREF(found);
    return found;
}

/* reset() -> int: 0 refused (a block is referenced), 1 nothing cached, 2 cleared. */
static PyObject *Pool_reset(Pool *p, PyObject *Py_UNUSED(ignored))
{
    if (p->free_blocks != p->total_blocks)
        return new_int(0);
    if (!p->n_cached)
        return new_int(1);
    for (int32_t b = p->lru_head; b != NONE;) {
        int32_t next = p->next[b];
        p->has_hash[b] = 0;
        p->prev[b] = NOT_IN_LRU;
        if (stack_push(&p->empty, b) < 0)
            return NULL;
        b = next;
    }
    p->lru_head = p->lru_tail = NONE;
    p->lru_len = 0;
    map_clear(p);
    return new_int(2);
}

/* Snapshots of the state, for tests and checks (the reference's attributes). */
static PyObject *Pool_ref_counts(Pool *p, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(p->created);
    if (!out)
        return NULL;
    for (Py_ssize_t b = 0; b < p->created; b++) {
        PyObject *o = PyLong_FromSsize_t(p->refs[b]);
        if (!o) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, b, o);
    }
    return out;
}

static PyObject *Pool_block_hashes(Pool *p, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(p->created);
    if (!out)
        return NULL;
    for (Py_ssize_t b = 0; b < p->created; b++) {
        PyObject *o;
        if (p->has_hash[b]) {
            o = PyLong_FromLongLong(p->hashes[b]);
        } else {
            o = Py_None;
            Py_INCREF(o);
        }
        if (!o) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, b, o);
    }
    return out;
}

static PyObject *int_list(const int32_t *at, Py_ssize_t n)
{
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = new_int(at[i]);
        if (!o) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, o);
    }
    return out;
}

static PyObject *Pool_lru(Pool *p, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (int32_t b = p->lru_head; b != NONE; b = p->next[b]) {
        PyObject *o = new_int(b);
        if (!o || PyList_Append(out, o) < 0) {
            Py_XDECREF(o);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(o);
    }
    return out;
}

static PyObject *Pool_empty(Pool *p, PyObject *Py_UNUSED(ignored))
{
    return int_list(p->empty.at, p->empty.len);
}

static PyObject *Pool_get_free(Pool *p, void *c) { return PyLong_FromSsize_t(p->free_blocks); }
static PyObject *Pool_get_total(Pool *p, void *c) { return PyLong_FromSsize_t(p->total_blocks); }
static PyObject *Pool_get_size(Pool *p, void *c) { return PyLong_FromSsize_t(p->block_size); }
static PyObject *Pool_get_lru_len(Pool *p, void *c) { return PyLong_FromSsize_t(p->lru_len); }
static PyObject *Pool_get_n_cached(Pool *p, void *c) { return PyLong_FromSsize_t(p->n_cached); }

/* hash_blocks(hashes, full_blocks, prompt, output, root=the pool's) -> hashes:
 * extend_hashes with this pool's block size; `root` the first block's parent (kv.hash_root). */
static PyObject *Pool_hash_blocks(Pool *p, PyObject *args)
{
    PyObject *hashes, *prompt, *output;
    Py_ssize_t full;
    long long root = p->root;
    if (!PyArg_ParseTuple(args, "OnO!O|L", &hashes, &full, &PyTuple_Type, &prompt, &output,
                          &root))
        return NULL;
    if (hash_chain(hashes, full, p->block_size, root, prompt, output) < 0)
        return NULL;
    Py_INCREF(hashes);
    return hashes;
}

/* take(hits, need, evicted=None) -> array('q') | None: a reference on each cached hit
 * and `need` fresh blocks after them (BlockPool.take), or None with nothing taken when
 * too few are free. */
static PyObject *Pool_take(Pool *p, PyObject *args)
{
    PyObject *arg, *evicted = Py_None;
    Py_ssize_t need;
    if (!PyArg_ParseTuple(args, "On|O", &arg, &need, &evicted))
        return NULL;
    if (need < 0)
        need = 0;
    Ids hits;
    if (ids_open(&hits, arg, "take: block ids") < 0)
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t freed = free_among(p, &hits);
    if (freed < 0)
        goto done;
    if (need + freed > p->free_blocks) {
        out = Py_None;
        Py_INCREF(out);
        goto done;
    }
    int64_t *at;
    out = new_ids(hits.len + need, &at);
    if (!out)
        goto done;
    for (Py_ssize_t i = 0; i < hits.len; i++) {
        int32_t b;
        if (block_at(p, &hits, i, &b) < 0) { /* checked by free_among: cannot fail */
            Py_CLEAR(out);
            goto done;
        }
        at[i] = b;
    }
    if (touch(p, &hits) < 0 || allocate_into(p, need, at + hits.len, evicted) < 0)
        Py_CLEAR(out);
done:
    ids_close(&hits);
    return out;
}

static PyMethodDef Pool_methods[] = {
    {"allocate", (PyCFunction)Pool_allocate, METH_VARARGS, "allocate(n, evicted=None)"},
    {"release", (PyCFunction)Pool_release, METH_O, "release(block_ids)"},
    {"lookup", (PyCFunction)Pool_lookup, METH_VARARGS, "lookup(block_hashes, max_blocks)"},
    {"free_among", (PyCFunction)Pool_free_among, METH_O, "free_among(block_ids)"},
    {"touch", (PyCFunction)Pool_touch, METH_O, "touch(block_ids)"},
    {"cache", (PyCFunction)Pool_cache, METH_VARARGS, "cache(ids, hashes, start, end)"},
    {"any_cached", (PyCFunction)Pool_any_cached, METH_O, "any_cached(block_hashes)"},
    {"hash_blocks", (PyCFunction)Pool_hash_blocks, METH_VARARGS,
     "hash_blocks(hashes, full_blocks, prompt, output, root)"},
    {"take", (PyCFunction)Pool_take, METH_VARARGS, "take(hits, need, evicted=None)"},
    {"reset", (PyCFunction)Pool_reset, METH_NOARGS, "reset() -> 0 refused, 1 none, 2 cleared"},
    {"ref_counts", (PyCFunction)Pool_ref_counts, METH_NOARGS, "by block id"},
    {"block_hashes", (PyCFunction)Pool_block_hashes, METH_NOARGS, "by block id, None: none"},
    {"lru", (PyCFunction)Pool_lru, METH_NOARGS, "free cached blocks, oldest first"},
    {"empty", (PyCFunction)Pool_empty, METH_NOARGS, "free empty blocks, next out last"},
    {NULL}};

static PyGetSetDef Pool_getset[] = {
    {"free_blocks", (getter)Pool_get_free, NULL, NULL, NULL},
    {"total_blocks", (getter)Pool_get_total, NULL, NULL, NULL},
    {"block_size", (getter)Pool_get_size, NULL, NULL, NULL},
    {"lru_len", (getter)Pool_get_lru_len, NULL, NULL, NULL},
    {"n_cached", (getter)Pool_get_n_cached, NULL, NULL, NULL},
    {NULL}};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memorywall.server.engine._kernel.Pool",
    .tp_doc = "KV block pool state in C arrays (kv.BlockPool's reference semantics).",
    .tp_basicsize = sizeof(Pool),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pool_init,
    .tp_dealloc = (destructor)Pool_dealloc,
    .tp_methods = Pool_methods,
    .tp_getset = Pool_getset,
};

/* ---- module functions ---- */

/* Append the hashes of blocks len(hashes)..full-1 to `hashes` (a list of ints, or an
 * array('q'), extended with one `frombytes`): kv.extend_block_hashes with the sequence's
 * tokens given as its prompt (tuple) and output (`Ids`). */
static int hash_chain(PyObject *hashes, Py_ssize_t full, Py_ssize_t size, int64_t root,
                      PyObject *prompt, PyObject *output)
{
    int64_t parent = root;
    Py_ssize_t done;
    if (PyList_Check(hashes)) {
        done = PyList_GET_SIZE(hashes);
        if (done && done < full) {
            parent = PyLong_AsLongLong(PyList_GET_ITEM(hashes, done - 1));
            if (parent == -1 && PyErr_Occurred())
                return -1;
        }
    } else {
        Ids have;
        if (ids_open(&have, hashes, "block hashes") < 0)
            return -1;
        done = have.len;
        if (done && done < full && ids_get(&have, done - 1, &parent) < 0) {
            ids_close(&have);
            return -1;
        }
        ids_close(&have); /* released before `frombytes` resizes it */
    }
    if (done >= full)
        return 0;
    Ids out;
    if (ids_open(&out, output, "token ids") < 0)
        return -1;
    int rc = -1;
    int64_t *made = NULL;
    Py_ssize_t plen = PyTuple_GET_SIZE(prompt);
    if (full * size > plen + out.len) {
        PyErr_SetString(PyExc_ValueError, "extend_hashes: fewer tokens than full blocks");
        goto done;
    }
    made = PyMem_Malloc((full - done) * sizeof(int64_t));
    if (!made) {
        PyErr_NoMemory();
        goto done;
    }
    /* hash((parent, block)) = finish(lane(lane(P5, hash(parent)), hash(block)), 2) */
    for (Py_ssize_t blk = done; blk < full; blk++) {
        uint64_t acc = XXPRIME_5;
        Py_ssize_t t = blk * size;
        for (Py_ssize_t j = 0; j < size; j++, t++) {
            Py_hash_t th = t < plen ? token_hash(PyTuple_GET_ITEM(prompt, t))
                                    : ids_hash(&out, t - plen);
            if (th == -1)
                goto done;
            acc = tuple_lane(acc, (uint64_t)th);
        }
        int64_t block_hash = tuple_finish(acc, (uint64_t)size);
        uint64_t outer = tuple_lane(XXPRIME_5, (uint64_t)int_hash(parent));
        outer = tuple_lane(outer, (uint64_t)block_hash);
        parent = tuple_finish(outer, 2);
        made[blk - done] = parent;
    }
    if (PyList_Check(hashes)) {
        for (Py_ssize_t i = 0; i < full - done; i++) {
            PyObject *o = PyLong_FromLongLong(made[i]);
            if (!o || PyList_Append(hashes, o) < 0) {
                Py_XDECREF(o);
                goto done;
            }
            Py_DECREF(o);
        }
    } else {
        PyObject *view = PyMemoryView_FromMemory((char *)made,
                                                 (full - done) * sizeof(int64_t), PyBUF_READ);
        if (!view)
            goto done;
        PyObject *r = PyObject_CallMethod(hashes, "frombytes", "O", view);
        Py_DECREF(view);
        if (!r)
            goto done;
        Py_DECREF(r);
    }
    rc = 0;
done:
    PyMem_Free(made);
    ids_close(&out);
    return rc;
}

/* extend_hashes(hashes, full_blocks, block_size, root, prompt, output) -> hashes */
static PyObject *extend_hashes(PyObject *m, PyObject *args)
{
    PyObject *hashes, *prompt, *output;
    Py_ssize_t full, size;
    long long root;
    if (!PyArg_ParseTuple(args, "OnnLO!O", &hashes, &full, &size, &root, &PyTuple_Type,
                          &prompt, &output))
        return NULL;
    if (size < 1) {
        PyErr_SetString(PyExc_ValueError, "extend_hashes: block_size must be >= 1");
        return NULL;
    }
    if (hash_chain(hashes, full, size, root, prompt, output) < 0)
        return NULL;
    Py_INCREF(hashes);
    return hashes;
}

/* splitmix64's output function, as tokens._splitmix_one. */
static inline uint64_t splitmix(uint64_t x)
{
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define MIX 0xD6E8FEB86659FD93ULL

/* draw_ids(table, drawn, seed, vocab, eos, out) -> None: TokenSource._draw's ids (the next
 * len(out) from draw `drawn` on, in reverse draw order, EOS draws moved off EOS) written
 * into `out`, a writable array('q'): no Python int is made. `table`: the fixed uint64
 * words (a buffer), `eos` a collection of ints. */
static PyObject *draw_ids(PyObject *m, PyObject *args)
{
    Py_buffer table, dest;
    Py_ssize_t drawn;
    unsigned long long seed, vocab;
    PyObject *eos;
    if (!PyArg_ParseTuple(args, "y*nKKOw*", &table, &drawn, &seed, &vocab, &eos, &dest))
        return NULL;
    PyObject *result = NULL;
    int64_t eos_ids[16];
    Py_ssize_t n_eos = 0;
    PyObject *eos_seq = PySequence_Fast(eos, "draw_ids: eos must be a collection");
    if (!eos_seq)
        goto done;
    n_eos = PySequence_Fast_GET_SIZE(eos_seq);
    if (n_eos > 16) {
        PyErr_SetString(PyExc_ValueError, "draw_ids: at most 16 EOS ids");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_eos; i++) {
        eos_ids[i] = PyLong_AsLongLong(PySequence_Fast_ITEMS(eos_seq)[i]);
        if (eos_ids[i] == -1 && PyErr_Occurred())
            goto done;
    }
    Py_ssize_t table_len = table.len / (Py_ssize_t)sizeof(uint64_t);
    if (table_len < 1 || vocab < 1 || drawn < 0) {
        PyErr_SetString(PyExc_ValueError, "draw_ids: empty table or vocabulary");
        goto done;
    }
    if (dest.itemsize != 8 || dest.len % 8) {
        PyErr_SetString(PyExc_TypeError, "draw_ids: out must be an array('q')");
        goto done;
    }
    const uint64_t *words = table.buf;
    int64_t *out = dest.buf;
    Py_ssize_t n = dest.len / 8;
    uint64_t stream_key = splitmix(seed); /* the token stream (0): seed ^ 0 * GOLDEN */
    Py_ssize_t k = 0;
    while (k < n) {
        /* One stretch of the table: draws `drawn`.. of block `b`, one key for all. */
        Py_ssize_t b = drawn / table_len, at = drawn % table_len;
        Py_ssize_t take = table_len - at < n - k ? table_len - at : n - k;
        uint64_t key = splitmix(stream_key + (uint64_t)b * GOLDEN);
        for (Py_ssize_t i = 0; i < take; i++, k++) {
            uint64_t id = (((words[at + i] ^ key) * MIX) >> 32) % vocab;
            for (int moved = n_eos > 0; moved;) {
                moved = 0;
                for (Py_ssize_t e = 0; e < n_eos; e++) {
                    if ((int64_t)id == eos_ids[e]) {
                        id = (id + 1) % vocab;
                        moved = 1;
                        break;
                    }
                }
            }
            out[n - 1 - k] = (int64_t)id;
        }
        drawn += take;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(eos_seq);
    PyBuffer_Release(&table);
    PyBuffer_Release(&dest);
    return result;
}

/* hash_tuple(t) -> int: hash(t), CPython's own value, for a tuple of ints and tuples of
 * ints (scheduler.token_seed's key, a prompt inside): their small exact ints read in
 * place, where hash() calls PyObject_Hash and long_hash for each of a prompt's tokens. */
static PyObject *hash_tuple(PyObject *m, PyObject *t)
{
    if (!PyTuple_Check(t)) {
        PyErr_SetString(PyExc_TypeError, "hash_tuple: a tuple");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    uint64_t acc = XXPRIME_5;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(t, i);
        Py_hash_t h = PyTuple_CheckExact(o) ? flat_tuple_hash(o) : token_hash(o);
        if (h == -1)
            return NULL;
        acc = tuple_lane(acc, (uint64_t)h);
    }
    return PyLong_FromLongLong(tuple_finish(acc, (uint64_t)n));
}

static PyMethodDef module_methods[] = {
    {"hash_tuple", hash_tuple, METH_O, "hash_tuple(t) -> hash(t)"},
    {"extend_hashes", extend_hashes, METH_VARARGS,
     "extend_hashes(hashes, full_blocks, block_size, root, prompt, output)"},
    {"draw_ids", draw_ids, METH_VARARGS, "draw_ids(table, drawn, seed, vocab, eos, out)"},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "The engine's compiled kernel (see kernel.py).", -1,
    module_methods};

PyMODINIT_FUNC PyInit__kernel(void)
{
    if (sizeof(Py_hash_t) != 8) {
        PyErr_SetString(PyExc_ImportError, "_kernel: needs a 64-bit Python");
        return NULL;
    }
    if (PyType_Ready(&PoolType) < 0)
        return NULL;
    if (!one_id) {
        PyObject *array = PyImport_ImportModule("array");
        if (!array)
            return NULL;
        one_id = PyObject_CallMethod(array, "array", "s[i]", "q", 0);
        Py_DECREF(array);
        if (!one_id)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "Pool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(&PoolType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
