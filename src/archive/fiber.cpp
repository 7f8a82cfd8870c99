#include "fiber.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <cstdint>

#include "layerd/sys/error.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define LAYERD_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LAYERD_ASAN 1
#endif
#endif

#ifdef LAYERD_ASAN
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, std::size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     std::size_t* size_old);
}
#endif

namespace layerd::archive::detail {

Fiber::Fiber(Entry entry, void* arg, std::size_t stack_size) : entry_(entry), arg_(arg) {
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  stack_size_ = (stack_size + page - 1) / page * page;
  mapping_size_ = stack_size_ + page;
  void* mapping = ::mmap(nullptr, mapping_size_, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  if (mapping == MAP_FAILED) throw Error(errno, "mmap of a fiber stack");
  mapping_ = mapping;
  // The lowest page is the guard: stacks grow down into it.
  if (::mprotect(mapping_, page, PROT_NONE) != 0) {
    int err = errno;
    ::munmap(mapping_, mapping_size_);
    throw Error(err, "mprotect of a fiber stack guard page");
  }
  if (::getcontext(&self_) != 0) throw Error(errno, "getcontext");
  self_.uc_stack.ss_sp = static_cast<char*>(mapping_) + page;
  self_.uc_stack.ss_size = stack_size_;
  self_.uc_link = nullptr;
  auto bits = reinterpret_cast<std::uintptr_t>(this);
  ::makecontext(&self_, reinterpret_cast<void (*)()>(&Fiber::trampoline), 2,
                static_cast<unsigned>(bits >> 32), static_cast<unsigned>(bits & 0xffffffffu));
}

Fiber::~Fiber() {
  // Destroying a suspended fiber would abandon the objects on its stack: callers run it to the
  // end first (the archive code aborts its input so libarchive unwinds).
  assert((!started_ || finished_) && "fiber destroyed while suspended");
  if (mapping_) ::munmap(mapping_, mapping_size_);
}

void Fiber::trampoline(unsigned hi, unsigned lo) {
  auto* self = reinterpret_cast<Fiber*>((static_cast<std::uintptr_t>(hi) << 32) | lo);
#ifdef LAYERD_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &self->caller_bottom_, &self->caller_size_);
#endif
  self->entry_(self->arg_);
  self->finished_ = true;
#ifdef LAYERD_ASAN
  // nullptr: this stack is done, ASan may free its fake frames.
  __sanitizer_start_switch_fiber(nullptr, self->caller_bottom_, self->caller_size_);
#endif
  ::setcontext(&self->caller_);
}

void Fiber::resume() {
  assert(!finished_);
  started_ = true;
#ifdef LAYERD_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, self_.uc_stack.ss_sp, self_.uc_stack.ss_size);
#endif
  ::swapcontext(&caller_, &self_);
#ifdef LAYERD_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

void Fiber::suspend() {
#ifdef LAYERD_ASAN
  __sanitizer_start_switch_fiber(&fake_stack_, caller_bottom_, caller_size_);
#endif
  ::swapcontext(&self_, &caller_);
#ifdef LAYERD_ASAN
  __sanitizer_finish_switch_fiber(fake_stack_, &caller_bottom_, &caller_size_);
#endif
}

}  // namespace layerd::archive::detail
