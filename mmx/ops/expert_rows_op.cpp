// The CPU kernel of the op mmx::expert_rows (defined in expert_rows.py): checks its inputs, then runs expert_rows.c.
//
// Written against torch's stable C ABI (torch/csrc/stable), so a decode graph compiled ahead of time calls it
// through the dispatcher without Python, and it builds from torch's light headers in seconds. Bad input raises a
// ValueError naming what is wrong; the kernel writes nothing before every check has passed.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

extern "C" {
int experts_f32(const float *x, const int64_t *ids, const float *mix, const float *gu, const void *gu_scale,
                const float *dn, const void *dn_scale, int scale_bf16, float *out, int N, int K, int E, int D, int I,
                int threads);
int experts_i8(const float *x, const int64_t *ids, const float *mix, const int8_t *gu, const void *gu_scale,
               const int8_t *dn, const void *dn_scale, int scale_bf16, float *out, int N, int K, int E, int D, int I,
               int threads);
int dense_f32(const float *x, const float *w, const void *scale, int scale_bf16, float *out, int N, int D, int O,
              int threads);
int dense_i8(const float *x, const int8_t *w, const void *scale, int scale_bf16, float *out, int N, int D, int O,
             int threads);
}

namespace {

using torch::stable::Tensor;
using Dtype = torch::headeronly::ScalarType;

constexpr int64_t kVector = 16;  // floats per vector in the kernel: D and I must be multiples of it

std::string describe(const Tensor &t) {
    std::ostringstream s;
    s << torch::headeronly::toString(t.scalar_type()) << " [";
    for (int64_t k = 0; k < t.dim(); k++) s << (k ? ", " : "") << t.size(k);
    s << "]" << (t.is_cpu() ? "" : " off the CPU");
    return s.str();
}

// pybind11 turns std::invalid_argument into Python's ValueError
[[noreturn]] void refuse(const std::string &what) { throw std::invalid_argument("mmx::expert_rows: " + what); }

bool shaped(const Tensor &t, std::initializer_list<int64_t> sizes) {
    if (t.dim() != static_cast<int64_t>(sizes.size())) return false;
    int64_t k = 0;
    for (int64_t size : sizes)
        if (t.size(k++) != size) return false;
    return true;
}

Tensor dense(const Tensor &t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// an uninitialised float32 CPU tensor [rows, width]
Tensor new_rows(int64_t rows, int64_t width) {
    int64_t sizes[2] = {rows, width}, strides[2] = {width, 1};
    AtenTensorHandle handle = nullptr;
    if (aoti_torch_empty_strided(2, sizes, strides, aoti_torch_dtype_float32(), aoti_torch_device_type_cpu(), 0,
                                 &handle) != AOTI_TORCH_SUCCESS)
        throw std::bad_alloc();
    return Tensor(handle);
}

Tensor expert_rows(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down,
                   std::optional<Tensor> gate_up_scale, std::optional<Tensor> down_scale, int64_t threads) {
    for (const Tensor *t : {&x, &ids, &weights, &gate_up, &down})
        if (!t->is_cpu()) refuse("every tensor must be on the CPU, got " + describe(*t));
    if (x.scalar_type() != Dtype::Float || x.dim() != 2) refuse("rows must be float32 [N, D], got " + describe(x));
    if (ids.scalar_type() != Dtype::Long || ids.dim() != 2 || ids.size(0) != x.size(0))
        refuse("expert ids must be int64 [N, k] for N rows, got " + describe(ids) + " for rows " + describe(x));
    const int64_t n = ids.size(0), k = ids.size(1);
    if (weights.scalar_type() != Dtype::Float || !shaped(weights, {n, k}))
        refuse("routing weights must be float32 like the ids, got " + describe(weights) + " for ids " + describe(ids));
    const bool quantized = gate_up.scalar_type() == Dtype::Char;
    if (down.dim() != 3 || (!quantized && gate_up.scalar_type() != Dtype::Float) ||
        down.scalar_type() != gate_up.scalar_type())
        refuse("gate|up [E, 2I, D] and down [E, D, I] must both be float32 or both int8, got " + describe(gate_up) +
               " and " + describe(down));
    const int64_t experts = down.size(0), d = down.size(1), inner = down.size(2);
    if (!shaped(gate_up, {experts, 2 * inner, d}) || x.size(1) != d)
        refuse("gate|up must be [E, 2I, D] for down [E, D, I] and rows [N, D], got " + describe(gate_up) + ", " +
               describe(down) + " and " + describe(x));
    if (d % kVector || inner % kVector)
        refuse("D and I must be multiples of " + std::to_string(kVector) + ", got " + describe(down));
    if (quantized != (gate_up_scale.has_value() && down_scale.has_value()) ||
        (!quantized && (gate_up_scale.has_value() || down_scale.has_value())))
        refuse("int8 weights take both scales ([E, 2I] and [E, D]), float32 weights none");
    bool bf16 = false;
    if (quantized) {
        const Tensor &gs = *gate_up_scale, &ds = *down_scale;
        const Dtype dtype = gs.scalar_type();
        if (!gs.is_cpu() || !ds.is_cpu() || (dtype != Dtype::Float && dtype != Dtype::BFloat16) ||
            ds.scalar_type() != dtype || !shaped(gs, {experts, 2 * inner}) || !shaped(ds, {experts, d}))
            refuse("scales must be CPU float32 or bfloat16 (both one dtype), [E, 2I] and [E, D], got " + describe(gs) +
                   " and " + describe(ds) + " for down " + describe(down));
        bf16 = dtype == Dtype::BFloat16;
    }
    if (threads < 1) refuse("threads must be 1 or more, got " + std::to_string(threads));

    x = dense(x), ids = dense(ids), weights = dense(weights), gate_up = dense(gate_up), down = dense(down);
    std::optional<Tensor> gs, ds;  // held here: the kernel reads them after this line
    if (quantized) gs = dense(*gate_up_scale), ds = dense(*down_scale);
    Tensor out = new_rows(n, d);
    const auto *rows = static_cast<const float *>(x.data_ptr());
    const auto *id = static_cast<const int64_t *>(ids.data_ptr());
    const auto *mix = static_cast<const float *>(weights.data_ptr());
    auto *result = static_cast<float *>(out.data_ptr());
    const int args[6] = {static_cast<int>(n), static_cast<int>(k), static_cast<int>(experts), static_cast<int>(d),
                         static_cast<int>(inner), static_cast<int>(threads)};
    const int failed =
        quantized ? experts_i8(rows, id, mix, static_cast<const int8_t *>(gate_up.data_ptr()), gs->data_ptr(),
                               static_cast<const int8_t *>(down.data_ptr()), ds->data_ptr(), bf16, result, args[0], args[1],
                               args[2], args[3], args[4], args[5])
                  : experts_f32(rows, id, mix, static_cast<const float *>(gate_up.data_ptr()), nullptr,
                                static_cast<const float *>(down.data_ptr()), nullptr, 0, result, args[0], args[1],
                                args[2], args[3], args[4], args[5]);
    if (failed == 2) refuse("an expert id is outside [0, " + std::to_string(experts) + ")");
    if (failed) throw std::bad_alloc();
    return out;
}

Tensor dense_rows(Tensor x, Tensor weight, std::optional<Tensor> scale, int64_t threads) {
    const bool quantized = weight.scalar_type() == Dtype::Char;
    if (!x.is_cpu() || !weight.is_cpu() || x.scalar_type() != Dtype::Float ||
        (!quantized && weight.scalar_type() != Dtype::Float) || x.dim() != 2 || weight.dim() != 2 ||
        x.size(1) != weight.size(1))
        throw std::invalid_argument("mmx::dense_rows: rows [N, D] and a weight [O, D] must be float32 CPU tensors "
                                    "(or an int8 weight), got " + describe(x) + " and " + describe(weight));
    const int64_t n = x.size(0), d = x.size(1), o = weight.size(0);
    if (d % kVector || o % 4)
        throw std::invalid_argument("mmx::dense_rows: D must be a multiple of " + std::to_string(kVector) +
                                    " and O of 4, got a weight " + describe(weight));
    if (quantized != scale.has_value())
        throw std::invalid_argument("mmx::dense_rows: an int8 weight takes its scale [O], a float32 weight none");
    bool bf16 = false;
    std::optional<Tensor> scales;  // held here: the kernel reads it after this line
    if (quantized) {
        const Dtype dtype = scale->scalar_type();
        if (!scale->is_cpu() || (dtype != Dtype::Float && dtype != Dtype::BFloat16) || !shaped(*scale, {o}))
            throw std::invalid_argument("mmx::dense_rows: the scale must be a float32 or bfloat16 CPU [O], got " +
                                        describe(*scale) + " for a weight " + describe(weight));
        bf16 = dtype == Dtype::BFloat16;
        scales = dense(*scale);
    }
    if (threads < 1) throw std::invalid_argument("mmx::dense_rows: threads must be 1 or more");
    x = dense(x), weight = dense(weight);
    Tensor out = new_rows(n, o);
    const auto *rows = static_cast<const float *>(x.data_ptr());
    auto *result = static_cast<float *>(out.data_ptr());
    const int args[4] = {static_cast<int>(n), static_cast<int>(d), static_cast<int>(o), static_cast<int>(threads)};
    if (quantized)
        dense_i8(rows, static_cast<const int8_t *>(weight.data_ptr()), scales->data_ptr(), bf16, result, args[0],
                 args[1], args[2], args[3]);
    else
        dense_f32(rows, static_cast<const float *>(weight.data_ptr()), nullptr, 0, result, args[0], args[1], args[2],
                  args[3]);
    return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmx, CPU, m) {
    m.impl("expert_rows", TORCH_BOX(&expert_rows));
    m.impl("dense_rows", TORCH_BOX(&dense_rows));
}

