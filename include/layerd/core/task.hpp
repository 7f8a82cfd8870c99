// Task<T>: a lazy coroutine with symmetric transfer. It starts when awaited, resumes its awaiter
// when it finishes (through symmetric transfer, so chains of synchronously finishing tasks do not
// grow the stack), and carries its value or exception across co_await. One owner; not copyable.
#pragma once

#include <cassert>
#include <coroutine>
#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

namespace layerd::core {

template <typename T = void>
class Task;

namespace detail {

// Symmetric transfer (await_suspend returning the next handle) keeps the stack flat only when the
// compiler turns the resumption into a tail call. Clang always does; GCC does with optimization
// but not at -O0 nor under AddressSanitizer, where a loop of a million synchronously finishing
// awaits overflows the stack. There the transfer goes through a trampoline instead: the next
// handle is parked in `trampoline_next` and the loop's resume (resume_and_drain, used by
// Loop::run_ready for every resumption) runs it after the current frame has returned.
#if defined(__SANITIZE_ADDRESS__) || !defined(__OPTIMIZE__)
#define LAYERD_TASK_TRAMPOLINE 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LAYERD_TASK_TRAMPOLINE 1
#endif
#endif

inline thread_local std::coroutine_handle<> trampoline_next;

// The handle an await_suspend/final_suspend should return to transfer control to `next`.
inline std::coroutine_handle<> transfer_to(std::coroutine_handle<> next) noexcept {
#ifdef LAYERD_TASK_TRAMPOLINE
  assert(!trampoline_next && "two transfers pending on one thread");
  trampoline_next = next;
  return std::noop_coroutine();
#else
  return next;
#endif
}

// Resumes `handle`, then whatever transfers it parked. Always drains, whichever way this
// translation unit was compiled, so translation units built with and without the trampoline
// work together.
inline void resume_and_drain(std::coroutine_handle<> handle) {
  handle.resume();
  while (trampoline_next) std::exchange(trampoline_next, nullptr).resume();
}

struct PromiseBase {
  std::coroutine_handle<> continuation = std::noop_coroutine();
  std::exception_ptr error;

  struct FinalAwaiter {
    bool await_ready() const noexcept { return false; }
    template <typename Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> self) noexcept {
      return transfer_to(self.promise().continuation);
    }
    void await_resume() const noexcept {}
  };

  std::suspend_always initial_suspend() const noexcept { return {}; }
  FinalAwaiter final_suspend() const noexcept { return {}; }
  void unhandled_exception() noexcept { error = std::current_exception(); }
  void rethrow_if_error() const {
    if (error) std::rethrow_exception(error);
  }
};

template <typename T>
struct Promise : PromiseBase {
  std::optional<T> value;
  Task<T> get_return_object() noexcept;
  void return_value(T v) { value.emplace(std::move(v)); }
  T take() {
    rethrow_if_error();
    assert(value.has_value());
    return std::move(*value);
  }
};

template <>
struct Promise<void> : PromiseBase {
  Task<void> get_return_object() noexcept;
  void return_void() const noexcept {}
  void take() const { rethrow_if_error(); }
};

}  // namespace detail

template <typename T>
class [[nodiscard]] Task {
 public:
  using promise_type = detail::Promise<T>;
  using Handle = std::coroutine_handle<promise_type>;

  Task() noexcept = default;
  explicit Task(Handle h) noexcept : handle_(h) {}
  Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      destroy();
      handle_ = std::exchange(other.handle_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() { destroy(); }

  [[nodiscard]] bool valid() const noexcept { return static_cast<bool>(handle_); }
  [[nodiscard]] bool done() const noexcept { return !handle_ || handle_.done(); }

  auto operator co_await() && noexcept { return Awaiter{handle_}; }
  auto operator co_await() & noexcept { return Awaiter{handle_}; }

  // For drivers (the loop's block_on, Scope): start the task with `continuation` resumed at its
  // end. Returns the handle to resume.
  Handle start_with(std::coroutine_handle<> continuation) noexcept {
    handle_.promise().continuation = continuation;
    return handle_;
  }
  // Takes the result of a finished task (rethrows its exception).
  decltype(auto) result() {
    assert(done());
    return handle_.promise().take();
  }

 private:
  struct Awaiter {
    Handle handle;
    bool await_ready() const noexcept { return !handle || handle.done(); }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiting) noexcept {
      handle.promise().continuation = awaiting;
      return detail::transfer_to(handle);
    }
    decltype(auto) await_resume() {
      assert(handle && "awaiting an empty Task");
      return handle.promise().take();
    }
  };

  void destroy() noexcept {
    if (handle_) {
      handle_.destroy();
      handle_ = {};
    }
  }

  Handle handle_;
};

namespace detail {
template <typename T>
Task<T> Promise<T>::get_return_object() noexcept {
  return Task<T>{std::coroutine_handle<Promise<T>>::from_promise(*this)};
}
inline Task<void> Promise<void>::get_return_object() noexcept {
  return Task<void>{std::coroutine_handle<Promise<void>>::from_promise(*this)};
}
}  // namespace detail

}  // namespace layerd::core
