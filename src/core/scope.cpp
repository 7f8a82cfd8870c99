#include "layerd/core/scope.hpp"

#include <algorithm>
#include <cassert>
#include <cerrno>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"

namespace layerd::core {

// A fire-and-forget coroutine frame: starts suspended (so spawn() can post it) and frees itself
// at the end.
struct Scope::Detached {
  struct promise_type {
    Detached get_return_object() noexcept {
      return Detached{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    std::suspend_never final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    void unhandled_exception() const noexcept { std::terminate(); }
  };
  std::coroutine_handle<promise_type> handle;
};

class Scope::JoinAwaiter final : public Cancellable {
 public:
  JoinAwaiter(Scope& scope, CancelSource* cancel) : scope_(scope), cancel_(cancel) {}
  bool await_ready() const noexcept { return scope_.active_ == 0; }
  void await_suspend(std::coroutine_handle<> h) {
    waiter_ = h;
    if (!register_with(cancel_)) {
      cancelled_ = true;
      Loop::current().post(h);
      return;
    }
    scope_.joiners_.push_back(this);
  }
  bool await_resume() const noexcept { return !cancelled_; }
  void wake() noexcept {
    unregister();
    Loop::current().post(waiter_);
  }
  ~JoinAwaiter() { unregister(); }

 private:
  void request_cancel() noexcept override {
    auto& list = scope_.joiners_;
    list.erase(std::remove(list.begin(), list.end(), this), list.end());
    cancelled_ = true;
    Loop::current().post(waiter_);
  }
  Scope& scope_;
  CancelSource* cancel_;
  std::coroutine_handle<> waiter_;
  bool cancelled_ = false;
};

Scope::~Scope() { assert(active_ == 0 && "Scope destroyed with running tasks: join it first"); }

Scope::Detached Scope::run_detached(Task<void> task, Scope* scope) {
  std::exception_ptr error;
  try {
    co_await std::move(task);
  } catch (...) {
    error = std::current_exception();
  }
  scope->finished(error);
}

void Scope::spawn(Task<void> task) {
  ++active_;
  Loop::current().post(run_detached(std::move(task), this).handle);
}

void Scope::finished(std::exception_ptr error) noexcept {
  if (error) {
    ++failed_;
    if (on_error_) on_error_(error);
  }
  if (--active_ == 0) {
    auto joiners = std::move(joiners_);
    joiners_.clear();
    for (JoinAwaiter* joiner : joiners) joiner->wake();
  }
}

Task<bool> Scope::join(CancelSource* cancel) { co_return co_await JoinAwaiter(*this, cancel); }

Task<bool> Scope::join_for(std::chrono::nanoseconds deadline) {
  CancelSource cancel;
  Deadline timer(cancel, deadline);
  bool joined = co_await join(&cancel);
  timer.disarm();
  co_return joined;
}

}  // namespace layerd::core
