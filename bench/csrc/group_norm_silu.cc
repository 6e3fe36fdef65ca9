// GroupNorm, with the SiLU after it, as one ONNX Runtime CPU custom operator: celeba_ddpm.GroupNormSiLU.
// An experiment for issue 21 (bench/fused_group_norm.py builds it, bench/runner_profile.py times it): ORT has no CPU
// GroupNorm kernel, so the exported graph runs each GroupNorm+SiLU as six nodes.
//   inputs  X (N, C, H, W) float, scale (C), bias (C);  output Y like X
//   attrs   num_groups (int), epsilon (float), silu (int: 1 applies x * sigmoid(x) after the affine)
// Each (image, group) is computed whole by one thread, in the same order at every batch size and thread count, so an
// image's output does not depend on what shares its batch.
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

namespace {

struct Work {
  const float *x, *scale, *bias;
  float *y;
  int64_t groups, channels_per_group, hw;
  float eps;
  bool silu;
};

void one_group(void *data, size_t index) {  // index = image * groups + group
  const Work &w = *static_cast<const Work *>(data);
  const int64_t count = w.channels_per_group * w.hw, g = static_cast<int64_t>(index) % w.groups;
  const float *x = w.x + static_cast<int64_t>(index) * count;
  float *y = w.y + static_cast<int64_t>(index) * count;
  float sum = 0.f;
  for (int64_t i = 0; i < count; i++) sum += x[i];
  const float mean = sum / count;
  float squares = 0.f;  // two passes: the variance from deviations, not E[x^2] - mean^2
  for (int64_t i = 0; i < count; i++) squares += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.f / std::sqrt(squares / count + w.eps);
  for (int64_t c = 0; c < w.channels_per_group; c++) {
    const int64_t channel = g * w.channels_per_group + c;
    const float a = w.scale[channel] * rstd, b = w.bias[channel] - mean * a;
    const float *xc = x + c * w.hw;
    float *yc = y + c * w.hw;
    if (w.silu) {
      for (int64_t i = 0; i < w.hw; i++) {
        const float h = xc[i] * a + b;
        yc[i] = h / (1.f + std::exp(-h));
      }
    } else {
      for (int64_t i = 0; i < w.hw; i++) yc[i] = xc[i] * a + b;
    }
  }
}

struct Kernel {
  int64_t groups;
  float eps;
  bool silu;

  Kernel(const OrtApi &, const OrtKernelInfo *info) {
    Ort::ConstKernelInfo attrs(info);
    groups = attrs.GetAttribute<int64_t>("num_groups");
    eps = attrs.GetAttribute<float>("epsilon");
    silu = attrs.GetAttribute<int64_t>("silu") != 0;
  }

  void Compute(OrtKernelContext *context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0);
    const std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
    int64_t hw = 1;
    for (size_t i = 2; i < shape.size(); i++) hw *= shape[i];
    auto y = ctx.GetOutput(0, shape);
    Work w{x.GetTensorData<float>(), ctx.GetInput(1).GetTensorData<float>(), ctx.GetInput(2).GetTensorData<float>(),
           y.GetTensorMutableData<float>(), groups, shape[1] / groups, hw, eps, silu};
    ctx.ParallelFor(one_group, static_cast<size_t>(shape[0] * groups), 0, &w);  // on the session's intra-op pool
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel> {
  void *CreateKernel(const OrtApi &api, const OrtKernelInfo *info) const { return new Kernel(api, info); }
  const char *GetName() const { return "GroupNormSiLU"; }
  const char *GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  // The output's shape is the input's. Without this ORT knows no shape downstream of the node and skips the
  // shape-dependent optimisations there (constant folding, NCHWc, fusions): the graph then ran no faster at all.
  static Ort::Status InferOutputShape(Ort::ShapeInferContext &ctx) {
    const auto &shape = ctx.GetInputShape(0);
    if (shape.empty()) return Ort::Status{nullptr};  // the input's shape is not known (yet): nor is the output's
    return ctx.SetOutputShape(0, shape);
  }
};

}  // namespace

extern "C" OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
  const OrtApi *api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // a runtime older than these headers: nothing registered, the load then fails
  Ort::InitApi(api);
  static Op op;
  static std::vector<Ort::CustomOpDomain> domains;  // a session's domain must outlive it: kept for the process
  static std::mutex lock;
  try {
    Ort::CustomOpDomain domain{"celeba_ddpm"};
    domain.Add(&op);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> guard(lock);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception &e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
