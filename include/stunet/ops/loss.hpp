#pragma once
// Being written; see issue 2.
#include "stunet/core/tensor.hpp"
