// Finite-difference gradient check shared by the model and router tests.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/pch.h"

namespace moecpt::testing {

// Central finite differences (h = 1e-6, use double precision) of the scalar f at
// a few entries of p, against p's autograd gradient; |Δ| ≤ abs_tol + 1e-5·|numeric|.
inline void expect_grad_matches_fd(const std::function<torch::Tensor()>& f, torch::Tensor p,
                                   const std::vector<int64_t>& flat_idx, const std::string& what,
                                   double abs_tol = 1e-6) {
  if (p.grad().defined()) p.mutable_grad().zero_();
  f().backward();
  auto analytic = p.grad().reshape({-1}).clone();
  torch::NoGradGuard no_grad;
  auto flat = p.view({-1});
  const double h = 1e-6;
  for (int64_t i : flat_idx) {
    const double orig = flat[i].item<double>();
    flat[i].fill_(orig + h);
    const double up = f().item<double>();
    flat[i].fill_(orig - h);
    const double down = f().item<double>();
    flat[i].fill_(orig);
    const double numeric = (up - down) / (2 * h);
    EXPECT_NEAR(analytic[i].item<double>(), numeric, abs_tol + 1e-5 * std::abs(numeric)) << what << " entry " << i;
  }
}

}  // namespace moecpt::testing
