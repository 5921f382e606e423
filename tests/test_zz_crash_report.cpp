// Test-binary aid: on SIGSEGV/SIGBUS/SIGABRT/SIGFPE print the faulting address
// and a native backtrace to stderr before dying, so a crash inside a test (e.g.
// on a machine without gdb) says where it happened.
#include <execinfo.h>
#include <signal.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>

namespace {

extern "C" void report_crash(int sig, siginfo_t* info, void* context) {
  char line[160];
  const auto* uc = static_cast<const ucontext_t*>(context);
#if defined(__x86_64__)
  const void* pc = reinterpret_cast<const void*>(uc->uc_mcontext.gregs[REG_RIP]);
  const void* sp = reinterpret_cast<const void*>(uc->uc_mcontext.gregs[REG_RSP]);
#else
  const void* pc = nullptr;
  const void* sp = nullptr;
#endif
  const int len = std::snprintf(line, sizeof line, "\n*** moecpt_tests: signal %d, fault address %p, pc %p, sp %p\n",
                                sig, info->si_addr, pc, sp);
  (void)!::write(2, line, size_t(len));
  void* frames[64];
  const int n = ::backtrace(frames, 64);
  ::backtrace_symbols_fd(frames, n, 2);
#if defined(__x86_64__)
  // The caller of a jump to a bad address is the return address on the stack.
  const void* ret = *reinterpret_cast<void* const*>(sp);
  const int len2 = std::snprintf(line, sizeof line, "*** return address at sp: %p\n", ret);
  (void)!::write(2, line, size_t(len2));
  void* one[1] = {const_cast<void*>(ret)};
  ::backtrace_symbols_fd(one, 1, 2);
  void* at_pc[1] = {const_cast<void*>(pc)};
  ::backtrace_symbols_fd(at_pc, 1, 2);
#endif
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

const bool installed = [] {
  struct sigaction sa {};
  sa.sa_sigaction = report_crash;
  sa.sa_flags = SA_SIGINFO;
  for (int sig : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE}) ::sigaction(sig, &sa, nullptr);
  return true;
}();

}  // namespace
