// A fiber: a small separate stack on the loop thread. libarchive pulls its input through a
// synchronous callback; running libarchive on a fiber lets that callback switch back to the loop
// (which awaits the socket) and continue when bytes have arrived, without blocking the loop and
// without a thread per job.
#pragma once

#include <ucontext.h>

#include <cstddef>

namespace layerd::archive::detail {

class Fiber {
 public:
  using Entry = void (*)(void*);

  // `stack_size` bytes of stack plus a guard page below it (a stack overflow faults at once).
  Fiber(Entry entry, void* arg, std::size_t stack_size = 256 * 1024);
  ~Fiber();
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // From the loop: runs the fiber until it calls suspend() or its entry returns.
  void resume();
  // From inside the fiber: switches back to whoever called resume().
  void suspend();
  [[nodiscard]] bool finished() const noexcept { return finished_; }

 private:
  static void trampoline(unsigned hi, unsigned lo);

  Entry entry_;
  void* arg_;
  void* mapping_ = nullptr;
  std::size_t mapping_size_ = 0;
  std::size_t stack_size_ = 0;
  ucontext_t caller_{};
  ucontext_t self_{};
  bool started_ = false;
  bool finished_ = false;
  // AddressSanitizer bookkeeping for stack switches (unused without ASan).
  void* fake_stack_ = nullptr;
  const void* caller_bottom_ = nullptr;
  std::size_t caller_size_ = 0;
};

}  // namespace layerd::archive::detail
