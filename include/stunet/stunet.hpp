#pragma once
/// \file
/// Everything CPU-side of stunet in one include: tensors, autograd and ops.
/// CUDA code lives under <stunet/cuda/...> and is included from .cu files.

#include "stunet/core/tensor.hpp"
#include "stunet/autograd/engine.hpp"
#include "stunet/ops/elementwise.hpp"
#include "stunet/ops/conv3d.hpp"
#include "stunet/ops/norm.hpp"
#include "stunet/ops/activation.hpp"
#include "stunet/ops/interp.hpp"
#include "stunet/ops/shape_ops.hpp"
#include "stunet/ops/softmax.hpp"
#include "stunet/ops/loss.hpp"
