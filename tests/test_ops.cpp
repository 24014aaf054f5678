// Filled by its owner; see tests/testing.hpp for the shared helpers.
#include "testing.hpp"
