// The host emulation stands in for CUDA's header (see cuda_emu.h).
#pragma once
#include "cuda_emu.h"
