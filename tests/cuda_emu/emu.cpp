// The CPU emulation of CUDA launches (emu.h): blocks in turn, threads as
// ucontext fibers that yield only at __syncthreads and warp shuffles.
#include "cuda_emu/emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cuda_emu {

namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kWarp = 32;

enum class Wait { kRunnable, kBarrier, kShuffle, kDone };

// A fiber's stack with a PROT_NONE page below it: an overflow faults instead
// of writing over the next fiber's stack.
class Stack {
 public:
  Stack() {
    page_ = size_t(sysconf(_SC_PAGESIZE));
    base_ = mmap(nullptr, kStackBytes + page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a fiber stack");
    mprotect(base_, page_, PROT_NONE);
  }
  ~Stack() { munmap(base_, kStackBytes + page_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  void* top() const { return static_cast<char*>(base_) + page_; }

 private:
  void* base_ = nullptr;
  size_t page_ = 0;
};

struct Fiber {
  ucontext_t ctx{};
  Stack stack;
  Dim3 tid;
  Wait wait = Wait::kRunnable;
  int line = 0;  // of the barrier or shuffle it waits at
  unsigned mask = 0;
  bool match = false;  // the warp op: __match_any_sync, else an xor shuffle
  int lane_mask = 0;
  float in = 0.f, out = 0.f;
  unsigned uin = 0, uout = 0;  // match_any's value and result
};

struct State {
  std::vector<std::unique_ptr<Fiber>> fibers;  // a pool: never moved once made
  ucontext_t scheduler{};
  Dim3 block, block_dim, grid_dim;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  Order order = Order::kForward;
  bool eager_warps = false;
  Counters counters;
  int last_error = 0;
};

State& state() {
  static State s;
  return s;
}

Fiber& current_fiber() {
  auto& s = state();
  if (s.current < 0) throw std::logic_error("cuda_emu: a device function was called outside a kernel launch");
  return *s.fibers[size_t(s.current)];
}

void fiber_entry() {
  auto& s = state();
  Fiber& f = current_fiber();
  try {
    (*s.body)();
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
  }
  f.wait = Wait::kDone;  // returning resumes the scheduler (uc_link)
}

void yield_to_scheduler(Fiber& f) { swapcontext(&f.ctx, &state().scheduler); }

[[noreturn]] void fail(const std::string& what) {
  std::ostringstream msg;
  msg << "cuda_emu: block " << state().block.x << ": " << what;
  throw std::runtime_error(msg.str());
}

// Releases every warp whose lanes all wait at a shuffle; a warp with only some
// of its lanes there can never complete (the others ended or wait at a barrier)
// when strict, else (in the middle of a round, eager warps) is left waiting.
bool release_shuffles(unsigned n, bool strict = true) {
  auto& s = state();
  bool released = false;
  for (unsigned w0 = 0; w0 < n; w0 += kWarp) {
    const unsigned lanes = std::min<unsigned>(kWarp, n - w0);
    unsigned at = 0;
    int line = 0;
    for (unsigned l = 0; l < lanes; ++l)
      if (s.fibers[w0 + l]->wait == Wait::kShuffle) ++at, line = s.fibers[w0 + l]->line;
    if (at == 0) continue;
    if (!strict && at != lanes) continue;
    std::ostringstream where;
    where << "warp " << w0 / kWarp << ", shuffle on line " << line << ": ";
    if (lanes != kWarp) {
      where << "the block's " << n << " threads are not whole warps";
      fail(where.str());
    }
    if (at != lanes) {
      where << "only " << at << " of 32 lanes reach a full-mask shuffle (";
      for (unsigned l = lanes; l-- > 0;) {  // the last lane not at the shuffle
        const Fiber& f = *s.fibers[w0 + l];
        if (f.wait == Wait::kDone) {
          where << "lane " << l << " has returned";
          break;
        }
        if (f.wait == Wait::kBarrier) {
          where << "lane " << l << " waits at __syncthreads on line " << f.line;
          break;
        }
      }
      where << ")";
      fail(where.str());
    }
    for (unsigned l = 0; l < lanes; ++l) {
      const Fiber& f = *s.fibers[w0 + l];
      if (f.mask != 0xffffffffu) fail(where.str() + "only full-mask shuffles are emulated");
      if (f.line != line) fail(where.str() + "lanes wait at shuffles on different lines");
      if (f.match != s.fibers[w0]->match) fail(where.str() + "lanes wait at different warp ops");
      if (!f.match && (f.lane_mask < 0 || f.lane_mask >= kWarp)) fail(where.str() + "xor offset out of [0, 32)");
    }
    for (unsigned l = 0; l < lanes; ++l) {
      Fiber& f = *s.fibers[w0 + l];
      if (f.match) {
        f.uout = 0;
        for (unsigned k = 0; k < lanes; ++k)
          if (s.fibers[w0 + k]->uin == f.uin) f.uout |= 1u << k;
      } else {
        f.out = s.fibers[w0 + (l ^ unsigned(f.lane_mask))]->in;
      }
      f.wait = Wait::kRunnable;
    }
    ++s.counters.warp_shuffles;
    released = true;
  }
  return released;
}

// Every thread still running waits at __syncthreads: release them, provided
// they wait at the same one (threads that returned count as arrived).
bool release_barrier(unsigned n) {
  auto& s = state();
  std::map<int, int> lines;
  for (unsigned i = 0; i < n; ++i)
    if (s.fibers[i]->wait == Wait::kBarrier) ++lines[s.fibers[i]->line];
  if (lines.empty()) return false;
  if (lines.size() > 1) {
    std::ostringstream what;
    what << "threads wait at different __syncthreads:";
    for (auto [line, count] : lines) what << " " << count << " on line " << line << ";";
    fail(what.str());
  }
  for (unsigned i = 0; i < n; ++i)
    if (s.fibers[i]->wait == Wait::kBarrier) s.fibers[i]->wait = Wait::kRunnable;
  ++s.counters.block_barriers;
  return true;
}

void run_block(unsigned n) {
  auto& s = state();
  while (s.fibers.size() < n) s.fibers.push_back(std::make_unique<Fiber>());
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = *s.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.top();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &s.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
    f.tid = Dim3{i, 0, 0};
    f.wait = Wait::kRunnable;
  }
  for (;;) {
    // every runnable thread runs until it waits or returns
    for (unsigned k = 0; k < n; ++k) {
      const unsigned i = s.order == Order::kForward ? k : n - 1 - k;
      Fiber& f = *s.fibers[i];
      if (f.wait != Wait::kRunnable) continue;
      s.current = int(i);
      swapcontext(&s.scheduler, &f.ctx);
      s.current = -1;
      if (s.error) {
        auto e = s.error;
        s.error = nullptr;
        std::rethrow_exception(e);
      }
      // eager warps: a warp just completed at a shuffle runs on first
      if (s.eager_warps && f.wait == Wait::kShuffle && release_shuffles(n, /*strict=*/false)) k = unsigned(-1);
    }
    bool all_done = true;
    for (unsigned i = 0; i < n; ++i) all_done = all_done && s.fibers[i]->wait == Wait::kDone;
    if (all_done) return;
    if (release_shuffles(n)) continue;
    if (!release_barrier(n)) fail("no thread can run (emulator bug)");
  }
}

}  // namespace

const Dim3& thread_idx() { return current_fiber().tid; }
const Dim3& block_idx() { return state().block; }
const Dim3& block_dim() { return state().block_dim; }
const Dim3& grid_dim() { return state().grid_dim; }

void syncthreads(int line) {
  Fiber& f = current_fiber();
  f.wait = Wait::kBarrier;
  f.line = line;
  yield_to_scheduler(f);
}

namespace {

// The current fiber waits at a warp op (release_shuffles completes it).
Fiber& wait_at_warp_op(unsigned mask, bool match, int line) {
  Fiber& f = current_fiber();
  f.wait = Wait::kShuffle;
  f.mask = mask;
  f.match = match;
  f.line = line;
  return f;
}

}  // namespace

float shfl_xor(unsigned mask, float v, int lane_mask, int line) {
  Fiber& f = wait_at_warp_op(mask, false, line);
  f.lane_mask = lane_mask;
  f.in = v;
  yield_to_scheduler(f);
  return f.out;
}

unsigned match_any(unsigned mask, unsigned v, int line) {
  Fiber& f = wait_at_warp_op(mask, true, line);
  f.uin = v;
  yield_to_scheduler(f);
  return f.uout;
}

void set_order(Order order) { state().order = order; }
void set_eager_warps(bool eager) { state().eager_warps = eager; }

int launch(unsigned grid, unsigned block, const std::function<void()>& body) {
  auto& s = state();
  if (s.current >= 0) throw std::logic_error("cuda_emu: a launch from inside a kernel");
  if (grid == 0 || block == 0 || block > 1024) return s.last_error = 9;  // cudaErrorInvalidConfiguration
  ++s.counters.launches;
  s.body = &body;
  s.block_dim = Dim3{block, 1, 1};
  s.grid_dim = Dim3{grid, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    s.block = Dim3{b, 0, 0};
    ++s.counters.blocks;
    s.counters.threads += block;
    run_block(block);
  }
  s.body = nullptr;
  return 0;
}

int take_last_error() {
  auto& s = state();
  const int e = s.last_error;
  s.last_error = 0;
  return e;
}

const Counters& counters() { return state().counters; }

}  // namespace cuda_emu
