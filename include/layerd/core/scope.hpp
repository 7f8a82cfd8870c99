// Scope: the only way to run detached work. spawn() starts a task that the scope owns; join()
// waits until every spawned task has finished. Shutdown joins the scopes, so no coroutine
// outlives the objects it uses. A task's exception is handed to the scope's error handler (or
// counted) and never escapes into the loop.
#pragma once

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <exception>
#include <functional>
#include <vector>

#include "layerd/core/cancel.hpp"
#include "layerd/core/task.hpp"

namespace layerd::core {

class Scope {
 public:
  using ErrorHandler = std::function<void(std::exception_ptr)>;
  explicit Scope(ErrorHandler on_error = {}) : on_error_(std::move(on_error)) {}
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  ~Scope();

  // Starts `task` on the loop (it first runs from the ready queue, not inline).
  void spawn(Task<void> task);

  // Waits until no spawned task is running. Resolves to false if `cancel` fired first.
  Task<bool> join(CancelSource* cancel = nullptr);
  // join() bounded by a deadline: false if tasks were still running when it passed.
  Task<bool> join_for(std::chrono::nanoseconds deadline);

  [[nodiscard]] std::size_t active() const noexcept { return active_; }
  [[nodiscard]] std::size_t failed() const noexcept { return failed_; }

 private:
  struct Detached;
  class JoinAwaiter;
  static Detached run_detached(Task<void> task, Scope* scope);
  void finished(std::exception_ptr error) noexcept;

  ErrorHandler on_error_;
  std::size_t active_ = 0;
  std::size_t failed_ = 0;
  std::vector<JoinAwaiter*> joiners_;
};

}  // namespace layerd::core
